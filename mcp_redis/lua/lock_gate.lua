-- Open a lock's fallback gate, and keep its fencing counter above the fallback's.
--
-- Run while the caller holds the lock in Redis and the name's PostgreSQL
-- advisory lock (transaction-scoped): no fallback hold exists at this moment.
-- KEYS[1] the gate ("no PostgreSQL fallback hold of this name", TTL ARGV[1] ms)
-- KEYS[2] the fencing counter
-- ARGV[1] gate TTL in ms, ARGV[2] the highest fencing token PostgreSQL has
-- recorded for the name, ARGV[3] the caller's fencing token
-- Returns the caller's fencing token: ARGV[3], or a fresh one above ARGV[2]
-- (and above the counter), written to the counter with a fresh TTL
-- (FENCE_TTL_MS, one hour: see the end of lock_fence.lua), when ARGV[3]
-- is not above ARGV[2].
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
if tonumber(ARGV[3]) > tonumber(ARGV[2]) then
  return tonumber(ARGV[3])
end
local fence = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[2])) + 1
redis.call('SET', KEYS[2], fence, 'PX', 3600000)
return fence
