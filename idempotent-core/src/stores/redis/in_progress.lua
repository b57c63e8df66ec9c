-- KEYS[1] record. A waiter's look, made after it subscribed to the key's channel: how long
-- the lease still runs, if the key is in progress. It marks the record ('w'), so that its
-- completion or release is published; a record nobody waits for is never published.
local stored = redis.pcall('GET', KEYS[1])
local state, problem = parse(KEYS[1], stored)
if state == nil then
  return { 'x', problem }
end
if state == 'p' or state == 'w' then
  if state == 'p' then
    redis.call('SET', KEYS[1], '2w' .. string.sub(stored, 3), 'KEEPTTL')
  end
  return { 'p', redis.call('PTTL', KEYS[1]) }
end
return { 'n' }
