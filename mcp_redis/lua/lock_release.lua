-- Release a lock held with ARGV[1] and hand it to the longest waiter.
--
-- KEYS[1] the lock, KEYS[2] the queue of waiters,
-- KEYS[3] (optional) the caller's own signal list: a waiter giving up
--         leaves the queue, and passes on a reservation made for it.
-- ARGV[1] the value the lock must hold (a holder's value, or "r:" .. KEYS[3])
-- ARGV[2] (optional) how long (ms) a reservation waits for its waiter to
--         claim it; default 1000 (HANDOFF_GRACE: one argument less to send
--         and convert on every release)
-- Returns 1 when the lock held ARGV[1] (and was passed on or deleted), else 0.
-- (A retry after a lost reply is told apart by the client: see RedisBackend.release.)
if KEYS[3] then
  redis.call('LREM', KEYS[2], 0, KEYS[3])
  redis.call('DEL', KEYS[3])
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local nxt = redis.call('LPOP', KEYS[2])
-- Wake the head waiter first. Its signal list is not among KEYS (the queue
-- names it), and in a Cluster slot being migrated Redis refuses a script's
-- undeclared key that is not on the node yet: then the lock is just freed,
-- and the waiter finds it at its next try (within a wait slice, <= 1 s).
if nxt and type(redis.pcall('LPUSH', nxt, '1')) == 'number' then
  local grace = ARGV[2] or 1000
  redis.call('PEXPIRE', nxt, grace)
  -- Reserve for that waiter so a releaser looping back cannot barge in;
  -- the reservation lapses if that waiter died.
  redis.call('SET', KEYS[1], 'r:' .. nxt, 'PX', grace)
else
  redis.call('DEL', KEYS[1])
end
return 1
