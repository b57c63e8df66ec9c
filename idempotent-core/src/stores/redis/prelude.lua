-- Shared by every script: the server's clock, and reading a record safely.
--
-- A record is a hash: v (format version), st ('p' in progress, 'c' completed, 'r' released),
-- fp (fingerprint, hex), fence (decimal), until (ms: lease end or expiry), out (output bytes).
-- Fences are the server's time in microseconds, or one more than the key's last fence: they
-- only grow, and stay below 2^53 so Lua's numbers hold them exactly.
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_ms = math.floor(now_us / 1000)

local function read(key)
  local fields = redis.pcall('HMGET', key, 'v', 'st', 'fp', 'fence', 'until')
  if fields['err'] then
    return nil, 'the key holds a ' .. redis.call('TYPE', key)['ok'] .. ', not an idempotency record'
  end
  if not fields[1] then
    if redis.call('EXISTS', key) == 1 then
      return nil, 'a hash without a format version field'
    end
    return false
  end
  if fields[1] ~= '1' then
    return nil, 'record format version ' .. fields[1] .. ' is not supported by this release'
  end
  local fence = tonumber(fields[4])
  local until_ms = tonumber(fields[5])
  local state = fields[2]
  if (state ~= 'p' and state ~= 'c' and state ~= 'r') or not fence or not until_ms then
    return nil, 'malformed record fields'
  end
  return { st = state, fp = fields[3], fence = fence, fence_text = fields[4], until_ms = until_ms }
end

local function held(record, fence_text)
  return record and record.st == 'p' and record.fence_text == fence_text and record.until_ms > now_ms
end

local function ms(value)
  return string.format('%.0f', value)
end
