-- Sliding-window counter (approximate, O(1) memory), all limits at once.
-- Windows are aligned on the server clock; the estimate is
--   previous * (time left in the current window / window) + current.
-- KEYS[i]: one integer per limit, which Redis keeps as a bare integer (no string):
--   - no count in the previous window: current * 4 + (window index mod 4),
--     one of Redis's shared integers (no object at all) below 10,000;
--   - else 2^51 + (current * 2^21 + previous) * 512 + (window index mod 512);
--   counts of 2^21 or more as the text "<index>:<current>:<previous>".
--   Every write sets the key to expire at the end of the window after its
--   own (within a ms or two: Redis counts TTLs in whole ms), so an index
--   mod 4 tells this window, the previous one and older ones apart (the mod
--   512 layout does it without the TTL; a simulated clock that outruns real
--   TTLs needs it: see the tests).
-- ARGV: cost (negative: peek, consume nothing), then limit_i, window_us_i for
--       each key, then optionally the time in us (tests simulate a clock).
-- Reply: "allowed refused-index(0 = none)" then, per limit,
--        " remaining retry_after_us reset_after_us" (integers, one string);
--        one limit admitted: the integer reset_after_us * (limit + 1) + remaining.
local M, W, P = 2097152, 512, 2251799813685248 -- 2^21 per count, 2^9 window indexes, 2^51

-- The (current, previous) counts of window `idx` from a key's value.
local function counts(v, idx)
  if not v then return 0, 0 end
  local w, c, p
  local sw, sc, sp = string.match(v, '^(%d+):(%d+):(%d+)$')
  if sw then
    w, c, p = tonumber(sw), tonumber(sc), tonumber(sp)
  else
    local x = tonumber(v)
    if x < P then
      w, c, p = idx - (idx - x) % 4, math.floor(x / 4), 0
    else
      x = x - P
      local q = math.floor(x / W)
      w = idx - (idx - x % W) % W
      c, p = math.floor(q / M), q % M
    end
  end
  if w == idx then return c, p end
  if w == idx - 1 then return 0, c end
  return 0, 0
end

local function encode(idx, c, p)
  if p == 0 and c < M then return string.format('%d', c * 4 + idx % 4) end
  if c < M and p < M then return string.format('%.0f', P + (c * M + p) * W + idx % W) end
  return string.format('%.0f:%d:%d', idx, c, p)
end

local cost = tonumber(ARGV[1])
local consume = cost > 0
if not consume then cost = -cost end
local now = tonumber(ARGV[2 + 2 * #KEYS])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end

local n = #KEYS
if n == 1 and consume then
  -- The common call, inline: one limit, admitted.
  local limit, window = tonumber(ARGV[2]), tonumber(ARGV[3])
  local idx = math.floor(now / window)
  local v = redis.call('GET', KEYS[1])
  local x = v and tonumber(v) -- nil for the text layout
  local c, p, same = 0, 0, false
  if x and x < P then
    local age = (idx - x) % 4
    if age == 0 then
      c, same = math.floor(x / 4), true
    elseif age == 1 then
      p = math.floor(x / 4)
    end
  elseif x then
    x = x - P
    local q = math.floor(x / W)
    local w = idx - (idx - x % W) % W
    if w == idx then
      c, p, same = math.floor(q / M), q % M, true
    elseif w == idx - 1 then
      p = math.floor(q / M)
    end
  elseif v then
    c, p = counts(v, idx)
  end
  local start = idx * window
  if p * (start + window - now) / window + c + cost <= limit then
    local left = start + 2 * window - now
    local after = c + cost
    if same and after < M then
      -- This window's key already expires at the end of the next one.
      if p == 0 then
        redis.call('SET', KEYS[1], after * 4 + idx % 4, 'KEEPTTL')
      else
        redis.call('SET', KEYS[1], P + (after * M + p) * W + idx % W, 'KEEPTTL')
      end
    else
      redis.call('SET', KEYS[1], encode(idx, after, p), 'PX', math.max(1, math.ceil(left / 1000)))
    end
    local est = p * (start + window - now) / window + c + cost
    -- An integer reply, no text to format: reset_after_us * (limit + 1) + remaining.
    local r = left * (limit + 1) + math.floor(limit - est)
    if r < 9e15 then return r end
    return '1 0 ' .. string.format('%d %d %d', math.floor(limit - est), 0, left)
  end
end
local idxs, curs, prevs = {}, {}, {}
local out = {'1', 0}
local refused, worst = 0, -1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local idx = math.floor(now / window)
  local c, p = counts(redis.call('GET', KEYS[i]), idx)
  idxs[i], curs[i], prevs[i] = idx, c, p
  local start = idx * window
  local est = p * (start + window - now) / window + c
  local retry, reset = 0, 0
  if c > 0 then
    reset = start + 2 * window - now
  elseif p > 0 then
    reset = start + window - now
  end
  if est + cost > limit then
    if p > 0 and c + cost <= limit then
      -- Still in this window, once the previous window's share decays.
      retry = start + window * (1 - (limit - c - cost) / p) - now
    else
      -- In the next window, where this window's count becomes the previous.
      local need = 0
      if c > 0 then need = math.max(0, 1 - (limit - cost) / c) end
      retry = start + window + window * need - now
    end
    -- One microsecond of slack against float rounding in the estimate.
    retry = math.max(1, math.ceil(retry) + 1)
    if retry > worst then worst, refused = retry, i end
  end
  out[3 * i], out[3 * i + 1], out[3 * i + 2] = math.floor(limit - est), retry, reset
end

if refused > 0 then
  out[1], out[2] = '0', refused
elseif consume then
  for i = 1, n do
    local window = tonumber(ARGV[2 * i + 1])
    local start = idxs[i] * window
    redis.call('SET', KEYS[i], encode(idxs[i], curs[i] + cost, prevs[i]),
               'PX', math.max(1, math.ceil((start + 2 * window - now) / 1000)))
    local limit = tonumber(ARGV[2 * i])
    local est = prevs[i] * (start + window - now) / window + curs[i] + cost
    out[3 * i] = math.floor(limit - est)
    out[3 * i + 2] = start + 2 * window - now
  end
end
-- One bulk string, not an array: a client without hiredis parses it in one read.
-- %d, not Lua's own %.14g: slower, and inexact from 1e14 (windows reach 3e14 us).
for j = 2, #out do
  local v = out[j]
  if v == 0 then out[j] = '0' else out[j] = string.format('%d', v) end
end
return table.concat(out, ' ')
