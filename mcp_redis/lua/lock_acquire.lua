-- Take a lock after a plain try failed, joining its FIFO of waiters on failure.
-- (The uncontended path is no script: ``SET lock token NX PX lease GET``.)
--
-- KEYS[1] the lock (value: holder's token, or "r:" .. <signal key> while it
--         is reserved for the waiter that owns that signal list)
-- KEYS[2] the queue of waiters (a list of their signal-list keys)
-- KEYS[3] this caller's signal list
-- ARGV[1] token, ARGV[2] lease in ms, ARGV[3] queue TTL in ms
-- KEYS[4] (optional, not on a Cluster: another slot) that holder's liveness
--         key: still gone here, or no takeover (it beat again meanwhile)
-- ARGV[4] (optional) a holder's value to take over: the caller found that
--         holder's process liveness key gone (it died or stalled)
-- Returns 1 when granted (the fencing token is drawn apart: lock_fence.lua),
-- else {0, PTTL of the lock, holder's value}.
local granted = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local holder
if not granted then
  -- Held: by us already (a retried call), reserved for us (a handoff), or not ours.
  holder = redis.call('GET', KEYS[1])
  if holder == ARGV[1] or holder == 'r:' .. KEYS[3]
      or (ARGV[4] and holder == ARGV[4] and not (KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1)) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    granted = true
  end
end
if granted then
  redis.call('LREM', KEYS[2], 0, KEYS[3])
  redis.call('DEL', KEYS[3])
  return 1
end
-- Armed atomically with the failed try: a release after this sees us.
if not redis.call('LPOS', KEYS[2], KEYS[3]) then
  redis.call('RPUSH', KEYS[2], KEYS[3])
end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return {0, redis.call('PTTL', KEYS[1]), holder or ''}
