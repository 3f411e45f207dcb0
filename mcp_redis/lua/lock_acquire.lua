-- Try to take a lock; with a queue given, join its FIFO of waiters on failure.
--
-- KEYS[1] the lock (value: holder's token, or "r:" .. <signal key> while it
--         is reserved for the waiter that owns that signal list)
-- KEYS[2] the fencing counter: the last token handed out, kept for
--         FENCE_TTL_MS (below); see "The fencing counter" at the end
-- KEYS[3] (optional) the queue of waiters (a list of their signal-list keys)
-- KEYS[4] (with KEYS[3]) this caller's signal list
-- ARGV[1] token, ARGV[2] lease in ms, ARGV[3] queue TTL in ms (with KEYS[3])
-- ARGV[4] (optional, with KEYS[3]) a holder's value to take over: the caller
--         found that holder's process liveness key gone (it died or stalled)
-- Without KEYS[3] this is a plain try (the uncontended fast path).
-- Returns the fencing token (a decimal string) when granted, else
-- {0, PTTL of the lock, holder's value}.
local granted = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local holder
if not granted then
  -- Held: by us already (a retried call), reserved for us (a handoff), or not ours.
  holder = redis.call('GET', KEYS[1])
  if holder == ARGV[1] or (KEYS[4] and holder == 'r:' .. KEYS[4]) or (ARGV[4] and holder == ARGV[4]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    granted = true
  end
end
if granted then
  if KEYS[4] then
    redis.call('LREM', KEYS[3], 0, KEYS[4])
    redis.call('DEL', KEYS[4])
  end
  -- The fencing counter, cheaply: strings (no INCR, no number formatting), one SET ... GET.
  -- The token is max(last + 1, TIME in us), so it is never below the
  -- server's clock: a counter lost with Redis's data, rolled back by a
  -- failover, or expired, still hands out tokens above every earlier one.
  local now = redis.call('TIME')
  local us = now[2]
  local early = #us < 6 -- the first tenth of a second (TIME drops leading zeros)
  if early then
    us = string.rep('0', 6 - #us) .. us
  end
  local floor = now[1] .. us
  -- One call writes the floor and reads the last token (SET ... GET).
  local last
  if early then
    last = redis.call('SET', KEYS[2], floor, 'PX', 3600000, 'GET')
  else
    last = redis.call('SET', KEYS[2], floor, 'KEEPTTL', 'GET')
  end
  -- Both are decimal integers without leading zeros: compare lengths, then text.
  if last and (#last > #floor or (#last == #floor and last >= floor)) then
    -- It was at or ahead of the clock (same microsecond, a clock stepped
    -- back, or raised by lock_gate): one above it, with a full TTL.
    local fence = tonumber(last) + 1
    redis.call('SET', KEYS[2], fence, 'PX', 3600000)
    return fence
  end
  if not last and not early then -- a new counter (KEEPTTL kept no TTL)
    redis.call('PEXPIRE', KEYS[2], 3600000)
  end
  return floor
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
return {0, redis.call('PTTL', KEYS[1]), holder or ''}

-- The fencing counter expires (FENCE_TTL_MS = 3600000, one hour; the literal
-- above, mcp_redis.locks.redis.FENCE_TTL in Python), yet tokens keep rising
-- across its expiry, because every value it holds is below its own expiry
-- time on the server's clock, the clock TIME reads and keys expire by:
-- * a write of the clock floor keeps the TTL it has (KEEPTTL: the key was
--   alive, so its expiry is later than now) or sets a fresh hour;
-- * a write above the clock (last + 1, or lock_gate raising it to
--   PostgreSQL's token) sets a fresh hour, so it holds while that value is
--   less than an hour ahead of the clock.
-- So once the counter is gone, TIME is past every token it held, and the
-- next token (at least TIME) is above them all. A write in the first tenth
-- of a second (about one grant in ten) sets a fresh hour instead of
-- keeping the TTL: a counter left without one (by a version before TTLs,
-- e.g. during a rolling upgrade) gets one back.
