-- KEYS[1] record; ARGV[1] fence, ARGV[2] channel to notify, ARGV[3] tombstone ms.
-- The record stays as a short-lived tombstone: claimable at once, but still holding the fence,
-- so the next claim's fence is larger even within the same microsecond.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if not held(record, ARGV[1]) then
  return { 'f' }
end
redis.call('HSET', KEYS[1], 'st', 'r', 'until', ms(now_ms))
redis.call('HDEL', KEYS[1], 'fp', 'out')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[2], 'r')
return { 'ok' }
