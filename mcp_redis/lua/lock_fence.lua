-- Draw a hold's fencing token: only while the lock holds the caller's token.
--
-- KEYS[1] the lock, KEYS[2] its fencing counter (the last token handed out,
--         kept for FENCE_TTL_MS: see "The fencing counter" at the end)
-- ARGV[1] the holder's token
-- Returns the fencing token (a decimal integer, as an integer or a string),
-- or false (nil) when the lock does not hold ARGV[1] (lost, released).
-- Drawn on first read of ``fencing_token``, or with the grant (``fencing=True``:
-- pipelined after the plain SET, so it sees that SET's outcome).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
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
