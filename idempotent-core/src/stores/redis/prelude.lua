-- Shared by every script: reading a record safely.
--
-- A record is one Redis string: the format '2', the state ('p' in progress, 'w' in progress
-- with a waiter to notify, 'c' completed, 'r' released), the fingerprint (64 hex digits; none
-- for 'r'), '|', the fence (decimal), '|', and for 'c' the output bytes. The key's PX is the
-- record's life: the lease while in progress, the ttl once completed, a short tombstone once
-- released. A record that is present is therefore live, and the scripts read
-- no clock. Fences come from the claiming process (its clock in microseconds, strictly
-- increasing within the process), or are one more than the key's last fence when its tombstone
-- is there: they stay below 2^53 so Lua's numbers hold them exactly.
--
-- Fields sit at fixed places and are cut out with string.sub: a pattern with captures, or a
-- table per record, costs the server more than the Redis commands of a replay.

-- Where the fence starts in a record with a fingerprint (after '2', the state, 64 hex digits
-- and '|').
local FENCE_AT = 68

-- `stored`: the reply of GET through pcall (a table if the key holds another type).
-- Returns the state, fingerprint, fence (number), fence (text) and where the output starts;
-- false if there is no record; nil and a description if the record is not readable.
local function parse(key, stored)
  if type(stored) == 'table' then
    return nil, 'the key holds a ' .. redis.call('TYPE', key)['ok'] ..
      ', not an idempotency record of this format (foreign data, or a record written by an earlier format)'
  end
  if not stored then
    return false
  end
  local version = string.sub(stored, 1, 1)
  if version ~= '2' then
    if string.find(version, '^%d$') then
      return nil, 'record format version ' .. version .. ' is not supported by this release'
    end
    return nil, 'malformed record'
  end
  local state = string.sub(stored, 2, 2)
  local fp, fence_at = '', 4
  if state == 'p' or state == 'w' or state == 'c' then
    fp, fence_at = string.sub(stored, 3, 66), FENCE_AT
  elseif state ~= 'r' then
    return nil, 'malformed record: unknown state'
  end
  local fence_end = string.sub(stored, fence_at - 1, fence_at - 1) == '|' and string.find(stored, '|', fence_at, true)
  local fence_text = fence_end and string.sub(stored, fence_at, fence_end - 1)
  local fence = fence_text and string.find(fence_text, '^%d+$') and tonumber(fence_text)
  if not fence then
    return nil, 'malformed record: no fence'
  end
  return state, fp, fence, fence_text, fence_end + 1
end

-- The output of `stored` if it is a completed record that `parse` would accept, with the
-- fingerprint `fp`; false otherwise. A replay's whole check, made without `parse`'s general
-- steps because replays are most of the calls.
local function replay(stored, fp)
  if type(stored) ~= 'string' or string.sub(stored, 1, 2) ~= '2c' or string.sub(stored, 3, 66) ~= fp
    or string.sub(stored, FENCE_AT - 1, FENCE_AT - 1) ~= '|' then
    return false
  end
  local _, fence_end = string.find(stored, '^%d+|', FENCE_AT)
  return fence_end and string.sub(stored, fence_end + 1)
end

-- Whether a record in `state` with `fence_text` is held by the fence `fence` (ARGV text).
local function held(state, fence_text, fence)
  return (state == 'p' or state == 'w') and fence_text == fence
end

local function read(key)
  return parse(key, redis.pcall('GET', key))
end

-- Tells the waiters of `key` that its record was completed or released (`what`): on the
-- channel `wait` subscribes to, the record key with 'done:' before its 64 hex digits. A key
-- ending in '}' is a Redis Cluster's (its hex in a hash tag): the channel is then a shard
-- channel with the same tag, on the record's shard (SPUBLISH; Redis 7.0).
local function announce(key, what)
  if string.byte(key, -1) == 125 then
    redis.call('SPUBLISH', string.sub(key, 1, -67) .. 'done:' .. string.sub(key, -66), what)
  else
    redis.call('PUBLISH', string.sub(key, 1, -65) .. 'done:' .. string.sub(key, -64), what)
  end
end
