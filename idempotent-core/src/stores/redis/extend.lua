-- KEYS[1] record; ARGV[1] fence, ARGV[2] lease ms.
local state, problem, _, fence_text = read(KEYS[1])
if state == nil then
  return { 'x', problem }
end
if not (state == 'p' or state == 'w') or fence_text ~= ARGV[1] then
  return { 'f' }
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return { 'ok' }
