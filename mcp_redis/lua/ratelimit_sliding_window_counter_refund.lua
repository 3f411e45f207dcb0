-- Refund of one admitted sliding-window-counter call: take `cost` off the
-- count of the clock-aligned window that counted it (the current count, or
-- the previous one once the window has moved on), never off another window.
-- KEYS[i]: the counts, in the layouts of ratelimit_sliding_window_counter.lua.
-- ARGV: cost, then limit_i, window_us_i, reset_us_i (the hit's reset_after:
--       the end of the window after the hit's, minus the hit's time) for
--       each key, then elapsed_us (the caller's time since the hit).
-- The hit's window index is round((now - elapsed + reset) / window) - 2:
-- exact while the caller's clock errs by less than half a window.
-- SET ... KEEPTTL keeps the key's expiry. Reply: how many limits got units back.
local M, W, P = 2097152, 512, 2251799813685248 -- as in the hit's script
local cost = tonumber(ARGV[1])
local n = #KEYS
local elapsed = tonumber(ARGV[2 + 3 * n])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local done = 0
for i = 1, n do
  local window = tonumber(ARGV[3 * i])
  local reset = tonumber(ARGV[3 * i + 1])
  local idx = math.floor((now - elapsed + reset) / window + 0.5) - 2
  local v = redis.call('GET', KEYS[i])
  if v then
    -- The layouts of ratelimit_sliding_window_counter.lua.
    local w, c, p
    local sw, sc, sp = string.match(v, '^(%d+):(%d+):(%d+)$')
    if sw then
      w, c, p = tonumber(sw), tonumber(sc), tonumber(sp)
    else
      local x = tonumber(v)
      local cur = math.floor(now / window)
      if x < P then
        w, c, p = cur - (cur - x) % 4, math.floor(x / 4), 0
      else
        x = x - P
        local q = math.floor(x / W)
        w = cur - (cur - x % W) % W
        c, p = math.floor(q / M), q % M
      end
    end
    local changed = false
    if w == idx and c > 0 then
      c, changed = math.max(0, c - cost), true
    elseif w == idx + 1 and p > 0 then
      p, changed = math.max(0, p - cost), true
    end
    if changed then
      local text
      if p == 0 and c < M then
        text = string.format('%d', c * 4 + w % 4)
      elseif c < M and p < M then
        text = string.format('%.0f', P + (c * M + p) * W + w % W)
      else
        text = string.format('%.0f:%d:%d', w, c, p)
      end
      redis.call('SET', KEYS[i], text, 'KEEPTTL')
      done = done + 1
    end
  end
end
return done
