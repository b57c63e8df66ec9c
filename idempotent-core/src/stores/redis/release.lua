-- KEYS[1] record; ARGV[1] fence, ARGV[2] channel to notify, ARGV[3] tombstone ms.
-- The record stays as a short-lived tombstone: claimable at once, but still holding the fence,
-- so the next claim's fence is larger even within the same microsecond.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if not holding(record, ARGV[1]) then
  return { 'f' }
end
redis.call('SET', KEYS[1], '2r|' .. ARGV[1] .. '|', 'PX', ARGV[3])
if record.st == 'w' then
  redis.call('PUBLISH', ARGV[2], 'r')
end
return { 'ok' }
