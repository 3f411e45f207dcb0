-- Refund of one admitted fixed-window call: give `cost` back to the window
-- that counted it, never to a later one.
-- KEYS[i]: the counters (one per limit), as in the hit.
-- ARGV: cost, then limit_i, window_us_i, reset_us_i (the hit's reset_after:
--       that window's time left at the hit) for each key, then elapsed_us
--       (the caller's time between the hit and this refund).
-- The hit's window is still open iff elapsed < reset, and then it is the
-- key's current lifetime iff PTTL <= reset: a window opened later ends at
-- least one window after the hit's, so its PTTL would exceed reset.
-- DECRBY keeps the TTL. Reply: how many limits got units back.
local cost = tonumber(ARGV[1])
local n = #KEYS
local elapsed = tonumber(ARGV[2 + 3 * n])
local done = 0
for i = 1, n do
  local reset = tonumber(ARGV[3 * i + 1])
  if elapsed < reset then
    local left = redis.call('PTTL', KEYS[i])
    local count = tonumber(redis.call('GET', KEYS[i]) or '0')
    if left > 0 and left * 1000 <= reset and count > 0 then
      redis.call('DECRBY', KEYS[i], math.min(cost, count))
      done = done + 1
    end
  end
end
return done
