-- KEYS[1] record; ARGV[1] fence, ARGV[2] lease ms.
-- Answers 1 when applied, 0 when fenced (an integer: no array to build), or { 'x', problem }.
local state, problem, _, fence_text = read(KEYS[1])
if state == nil then
  return { 'x', problem }
end
if not held(state, fence_text, ARGV[1]) then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
