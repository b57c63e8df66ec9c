-- KEYS[1] record; ARGV[1] fence, ARGV[2] output, ARGV[3] ttl ms, ARGV[4] channel to notify.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if not holding(record, ARGV[1]) then
  return { 'f' }
end
redis.call('SET', KEYS[1], '2c' .. record.fp .. '|' .. ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
-- Published only when a waiter marked the record: an uncontended call pays nothing for it.
if record.st == 'w' then
  redis.call('PUBLISH', ARGV[4], 'c')
end
return { 'ok' }
