-- Refund of one admitted GCRA call: move the theoretical arrival time (TAT)
-- back by what the call still owes, never by more.
-- KEYS[i]: the TATs (one per limit), as in the hit.
-- ARGV: cost, then limit_i, window_us_i, reset_us_i (the hit's reset_after:
--       its new TAT minus the hit's time) for each key, then elapsed_us.
-- With tat_j = the TAT the call left (now - elapsed + reset) and `later`
-- = TAT - tat_j (what calls admitted since added), the state without the
-- call is at most max(tat_j - cost * interval, now) + later: the refund
-- moves TAT back by min(cost * interval, tat_j - now), which never gives
-- more than the call took (safe), and exactly that while the call's own
-- debt is outstanding. Once tat_j <= now the bucket had refilled the
-- call's tokens already: nothing to give. Reply: how many limits got units back.
local cost = tonumber(ARGV[1])
local n = #KEYS
local elapsed = tonumber(ARGV[2 + 3 * n])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local done = 0
for i = 1, n do
  local interval = tonumber(ARGV[3 * i]) / tonumber(ARGV[3 * i - 1])
  local tat_j = now - elapsed + tonumber(ARGV[3 * i + 1])
  local v = redis.call('GET', KEYS[i])
  local tat = v and tonumber(v) / 4  -- quarter microseconds, as the hit stores it
  -- A call admitted since moved the TAT on by at least one interval: closer
  -- than half of one, the TAT is still this call's own, exactly (the
  -- caller's clock only estimates it, and errs on the early side).
  if tat and tat < tat_j + interval / 2 then tat_j = tat end
  -- A TAT well below the call's (the key was reset since) owes the call nothing.
  if tat and tat >= tat_j - interval / 2 then
    local back = math.min(cost * interval, tat_j - now)
    if back > 0 then
      local new = tat - back
      if new <= now then
        redis.call('DEL', KEYS[i])
      else
        redis.call('SET', KEYS[i], string.format('%.0f', new * 4), 'PX', math.max(1, math.ceil((new - now) / 1000)))
      end
      done = done + 1
    end
  end
end
return done
