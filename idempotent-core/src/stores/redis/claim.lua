-- KEYS[1] record; ARGV[1] fingerprint (hex), ARGV[2] lease ms.
local stored = redis.pcall('GET', KEYS[1])
local record, problem = parse(KEYS[1], stored)
if record == nil then
  return { 'x', problem }
end
if record and record.st ~= 'r' then
  if record.fp ~= ARGV[1] then
    return { 'm' }
  end
  if record.st == 'c' then
    return { 'c', string.sub(stored, record.out_at) }
  end
  return { 'p', redis.call('PTTL', KEYS[1]) }
end
-- Absent, or a tombstone: acquire, with a fence above the tombstone's.
local time = redis.call('TIME')
local fence = tonumber(time[1]) * 1000000 + tonumber(time[2])
if record and record.fence >= fence then
  fence = record.fence + 1
end
local fence_text = string.format('%.0f', fence)
redis.call('SET', KEYS[1], '2p' .. ARGV[1] .. '|' .. fence_text .. '|', 'PX', ARGV[2])
return { 'a', fence_text }
