-- KEYS[1] record; ARGV[1] fingerprint (hex), ARGV[2] lease ms, ARGV[3] grace ms.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if record and record.st ~= 'r' and record.until_ms > now_ms then
  if record.fp ~= ARGV[1] then
    return { 'm' }
  end
  if record.st == 'p' then
    return { 'p', record.until_ms - now_ms }
  end
  return { 'c', redis.call('HGET', KEYS[1], 'out') }
end
local fence = now_us
if record and record.fence >= fence then
  fence = record.fence + 1
end
local fence_text = ms(fence)
local lease = tonumber(ARGV[2])
-- A dead record's fields (its output among them) go; a fresh key has none to clear.
if record then
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'v', '1', 'st', 'p', 'fp', ARGV[1], 'fence', fence_text, 'until', ms(now_ms + lease))
redis.call('PEXPIRE', KEYS[1], lease + tonumber(ARGV[3]))
return { 'a', fence_text }
