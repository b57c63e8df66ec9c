-- KEYS[1] record; ARGV[1] fence, ARGV[2] lease ms, ARGV[3] grace ms.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if not held(record, ARGV[1]) then
  return { 'f' }
end
local lease = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'until', ms(now_ms + lease))
redis.call('PEXPIRE', KEYS[1], lease + tonumber(ARGV[3]))
return { 'ok' }
