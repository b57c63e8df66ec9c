-- KEYS[1] record; ARGV[1] fence, ARGV[2] tombstone ms.
-- Answers 1 when applied, 0 when fenced (an integer: no array to build), or { 'x', problem }.
-- The record stays as a short-lived tombstone: claimable at once, but still holding the fence,
-- so the next claim's fence is larger even within the same microsecond.
local state, problem, _, fence_text = read(KEYS[1])
if state == nil then
  return { 'x', problem }
end
if not held(state, fence_text, ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], '2r|' .. fence_text .. '|', 'PX', ARGV[2])
if state == 'w' then
  announce(KEYS[1], 'r')
end
return 1
