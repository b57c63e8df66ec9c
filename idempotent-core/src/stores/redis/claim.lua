-- KEYS[1] record; ARGV[1] fingerprint (hex), ARGV[2] lease ms, ARGV[3] the fence to take (the
-- caller's, as the native claim would have written it).
-- The native claim (`SET NX PX GET`, in `redis.rs`) answers absent keys and replays; this
-- script answers what it cannot: a tombstone, a key in progress, a malformed record, and
-- every claim on a server older than Redis 7.0.
-- Answers: the output (a bulk string) for a replay, the new fence (an integer) when acquired;
-- the rarer answers are tagged arrays. Scalars cost neither side an array to build.
local stored = redis.pcall('GET', KEYS[1])
local output = replay(stored, ARGV[1])
if output then
  return output
end
local state, fp, last_fence = parse(KEYS[1], stored)
if state == nil then
  -- parse answers nil and the problem when the record is not readable
  return { 'x', fp }
end
if state and state ~= 'r' then
  if fp ~= ARGV[1] then
    return { 'm' }
  end
  -- In progress: a completed record with this fingerprint was a replay above.
  return { 'p', redis.call('PTTL', KEYS[1]) }
end
-- Absent, or a tombstone: acquire, with a fence above the tombstone's.
local fence_text = ARGV[3]
local fence = tonumber(fence_text)
if state and last_fence >= fence then
  fence = last_fence + 1
  fence_text = string.format('%.0f', fence)
end
redis.call('SET', KEYS[1], '2p' .. ARGV[1] .. '|' .. fence_text .. '|', 'PX', ARGV[2])
return fence
