-- Try to take a lock; with a queue given, join its FIFO of waiters on failure.
--
-- KEYS[1] the lock (value: holder's token, or "r:" .. <signal key> while it
--         is reserved for the waiter that owns that signal list)
-- KEYS[2] the fencing counter (the only lock key without a TTL; never below TIME in us)
-- KEYS[3] (optional) the queue of waiters (a list of their signal-list keys)
-- KEYS[4] (with KEYS[3]) this caller's signal list
-- ARGV[1] token, ARGV[2] lease in ms, ARGV[3] queue TTL in ms (with KEYS[3])
-- ARGV[4] (optional, with KEYS[3]) a holder's value to take over: the caller
--         found that holder's process liveness key gone (it died or stalled)
-- Without KEYS[3] this is a plain try (the uncontended fast path).
-- Returns {1, fencing token} when granted, else {0, PTTL of the lock, holder's value}.
local granted = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not granted then
  -- Held: by us already (a retried call), reserved for us (a handoff), or not ours.
  local holder = redis.call('GET', KEYS[1])
  if holder == ARGV[1] or (KEYS[4] and holder == 'r:' .. KEYS[4]) or (ARGV[4] and holder == ARGV[4]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    granted = true
  end
end
if granted then
  -- Never below the server's clock in microseconds: a counter lost with
  -- Redis's data, or rolled back by a failover that lost increments, still
  -- hands out tokens above every token issued before.
  local fence = redis.call('INCR', KEYS[2])
  local now = redis.call('TIME')
  local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
  if fence < floor then
    fence = floor
    redis.call('SET', KEYS[2], fence)
  end
  if KEYS[4] then
    redis.call('LREM', KEYS[3], 0, KEYS[4])
    redis.call('DEL', KEYS[4])
  end
  return {1, fence}
end
if KEYS[4] then
  -- Armed atomically with the failed try: a release after this sees us.
  if not redis.call('LPOS', KEYS[3], KEYS[4]) then
    redis.call('RPUSH', KEYS[3], KEYS[4])
  end
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[3])
  end
end
return {0, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[1]) or ''}
