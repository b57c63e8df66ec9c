-- KEYS[1] record; ARGV[1] fence, ARGV[2] output, ARGV[3] ttl ms, ARGV[4] channel to notify.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if not held(record, ARGV[1]) then
  return { 'f' }
end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'st', 'c', 'out', ARGV[2], 'until', ms(now_ms + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[4], 'c')
return { 'ok' }
