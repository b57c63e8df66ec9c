-- KEYS[1] record; ARGV[1] fingerprint (hex), ARGV[2] lease ms.
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
-- Absent, or a tombstone: acquire, with a fence above the tombstone's. The fence is the
-- server's time in µs, written as text from TIME's two parts (string.format is slower).
local time = redis.call('TIME')
local fence_text = time[1] .. string.sub('00000' .. time[2], -6)
local fence = tonumber(fence_text)
if state and last_fence >= fence then
  fence = last_fence + 1
  fence_text = string.format('%.0f', fence)
end
redis.call('SET', KEYS[1], '2p' .. ARGV[1] .. '|' .. fence_text .. '|', 'PX', ARGV[2])
return fence
