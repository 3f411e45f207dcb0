-- Release a lock held with ARGV[1] and hand it to the longest waiter.
--
-- KEYS[1] the lock, KEYS[2] the queue of waiters,
-- KEYS[3] (optional) the caller's own signal list: a waiter giving up
--         leaves the queue, and passes on a reservation made for it.
-- ARGV[1] the value the lock must hold (a holder's value, or "r:" .. KEYS[3])
-- ARGV[2] how long (ms) a reservation waits for its waiter to claim it
-- ARGV[3] (a holder's release) how long (ms) to keep this call's release
--         record KEYS[1] .. "#d" .. <the last 32 characters of ARGV[1]: the
--         holder's per-call nonce>, so that this call retried after a lost
--         reply answers 1 again. Same hash tag as KEYS[1], so same slot.
-- Returns 1 when the lock held ARGV[1] (and was passed on or deleted), or
-- when this release already happened (its record exists); else 0.
if KEYS[3] then
  redis.call('LREM', KEYS[2], 0, KEYS[3])
  redis.call('DEL', KEYS[3])
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  if ARGV[3] and redis.call('EXISTS', KEYS[1] .. '#d' .. string.sub(ARGV[1], -32)) == 1 then
    return 1
  end
  return 0
end
local nxt = redis.call('LPOP', KEYS[2])
if nxt then
  -- Reserve for the head waiter so a releaser looping back cannot barge in;
  -- the reservation lapses if that waiter died.
  redis.call('SET', KEYS[1], 'r:' .. nxt, 'PX', ARGV[2])
  redis.call('LPUSH', nxt, '1')
  redis.call('PEXPIRE', nxt, ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
if ARGV[3] then
  redis.call('SET', KEYS[1] .. '#d' .. string.sub(ARGV[1], -32), '1', 'PX', ARGV[3])
end
return 1
