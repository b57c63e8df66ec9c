-- KEYS[1] record; ARGV[1] fence, ARGV[2] output, ARGV[3] ttl ms.
-- Answers 1 when applied, 0 when fenced (an integer: no array to build), or { 'x', problem }.
--
-- The common case first, with the fewest steps: the record is the holder's claim, which ends
-- with '|<fence>|' right after its fingerprint (a claim has no output), in state 'p' or 'w'.
local stored = redis.pcall('GET', KEYS[1])
local tail = '|' .. ARGV[1] .. '|'
if type(stored) == 'string' and string.sub(stored, FENCE_AT - 1) == tail then
  local head = string.sub(stored, 1, 2)
  if head == '2p' or head == '2w' then
    redis.call('SET', KEYS[1], '2c' .. string.sub(stored, 3, FENCE_AT - 2) .. tail .. ARGV[2], 'PX', ARGV[3])
    -- Published only when a waiter marked the record: an uncontended call pays nothing for it.
    if head == '2w' then
      announce(KEYS[1], 'c')
    end
    return 1
  end
end
-- Anything else is fenced, unless the record is not readable.
local state, problem = parse(KEYS[1], stored)
if state == nil then
  return { 'x', problem }
end
return 0
