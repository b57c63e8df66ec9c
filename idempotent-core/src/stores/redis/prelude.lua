-- Shared by every script: reading a record safely.
--
-- A record is one Redis string: the format '2', the state ('p' in progress, 'w' in progress
-- with a waiter to notify, 'c' completed, 'r' released), the fingerprint (64 hex digits; none
-- for 'r'), '|', the fence (decimal), '|', and for 'c' the output bytes. The key's PX is the
-- record's life: the lease while in progress, the ttl once completed, a short tombstone once
-- released. A record that is present is therefore live, and only a claim that acquires reads
-- the clock (`TIME`, for its fence). Fences are the server's time in microseconds, or one
-- more than the key's last fence: they only grow, and stay below 2^53 so Lua's numbers hold
-- them exactly.

-- `stored`: the reply of GET through pcall (a table if the key holds another type).
local function parse(key, stored)
  if type(stored) == 'table' then
    return nil, 'the key holds a ' .. redis.call('TYPE', key)['ok'] ..
      ', not an idempotency record of this format (foreign data, or a record written by an earlier format)'
  end
  if not stored then
    return false
  end
  local version, state, fp, fence_text, out_at = string.match(stored, '^(%d)(%a)(%x*)|(%d+)|()')
  if not version then
    return nil, 'malformed record'
  end
  if version ~= '2' then
    return nil, 'record format version ' .. version .. ' is not supported by this release'
  end
  local known = state == 'p' or state == 'w' or state == 'c' or state == 'r'
  if not known or (state ~= 'r' and #fp ~= 64) then
    return nil, 'malformed record fields'
  end
  return { st = state, fp = fp, fence = tonumber(fence_text), fence_text = fence_text, out_at = out_at }
end

local function read(key)
  return parse(key, redis.pcall('GET', key))
end

-- In progress under `fence_text`: the caller still holds the lease.
local function holding(record, fence_text)
  return record and (record.st == 'p' or record.st == 'w') and record.fence_text == fence_text
end
