-- Before a load: the entry's value (a leader may just have filled it) and
-- the epoch its write-back must still find (cache_fill.lua).
-- KEYS[1] value key, KEYS[2] epoch key (same hash slot)
-- ARGV[1] the marker's TTL in ms
-- Returns {value or nil, epoch}.
-- An entry nobody invalidated has no epoch: the load then leaves a marker,
-- "m" .. the server's clock in us, in its place. Were the write-back to
-- compare "no epoch" with "no epoch", an invalidation lost with Redis's data
-- meanwhile (a restart without persistence, a failover before the replica
-- had it) would read as none, and the load's old value would be written
-- back for every process to read. With the marker gone, it is refused. An
-- invalidation replaces the marker (cache_invalidate.lua reads it as 0); a
-- write-back that finds its marker deletes it (nothing stays behind).
local v = redis.call('GET', KEYS[1])
local e = redis.call('GET', KEYS[2])
if not e then
  local t = redis.call('TIME')
  e = 'm' .. t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
  redis.call('SET', KEYS[2], e, 'PX', ARGV[1])
end
return {v, e}
