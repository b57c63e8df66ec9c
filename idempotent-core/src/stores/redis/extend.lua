-- KEYS[1] record; ARGV[1] fence, ARGV[2] lease ms.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if not holding(record, ARGV[1]) then
  return { 'f' }
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return { 'ok' }
