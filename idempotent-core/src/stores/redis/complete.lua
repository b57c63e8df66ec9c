-- KEYS[1] record; ARGV[1] fence, ARGV[2] output, ARGV[3] ttl ms.
-- Answers 1 when applied, 0 when fenced (an integer: no array to build), or { 'x', problem }.
local state, fp, _, fence_text = read(KEYS[1])
if state == nil then
  -- parse answers nil and the problem when the record is not readable
  return { 'x', fp }
end
if not held(state, fence_text, ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], '2c' .. fp .. '|' .. fence_text .. '|' .. ARGV[2], 'PX', ARGV[3])
-- Published only when a waiter marked the record: an uncontended call pays nothing for it.
if state == 'w' then
  announce(KEYS[1], 'c')
end
return 1
