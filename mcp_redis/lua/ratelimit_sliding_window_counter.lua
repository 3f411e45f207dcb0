-- Sliding-window counter (approximate, O(1) memory), all limits at once.
-- Windows are aligned on the server clock; the estimate is
--   previous * (time left in the current window / window) + current.
-- KEYS[i]: one string per limit: "<window index>:<current count>:<previous count>".
-- ARGV: cost (negative: peek, consume nothing), then limit_i, window_us_i for
--       each key, then optionally the time in us (tests simulate a clock).
-- Reply: "allowed refused-index(0 = none)" then, per limit,
--        " remaining retry_after_us reset_after_us" (integers, one string).
local cost = tonumber(ARGV[1])
local consume = cost > 0
if not consume then cost = -cost end
local now = tonumber(ARGV[2 + 2 * #KEYS])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end

local n = #KEYS
local idxs, curs, prevs = {}, {}, {}
local out = {'1', 0}
local refused, worst = 0, -1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local idx = math.floor(now / window)
  local v = redis.call('GET', KEYS[i])
  local w, c, p = nil, 0, 0
  if v then
    local sw, sc, sp = string.match(v, '^(%d+):(%d+):(%d+)$')
    w, c, p = tonumber(sw), tonumber(sc) or 0, tonumber(sp) or 0
  end
  if w == idx - 1 then
    p, c = c, 0
  elseif w ~= idx then
    p, c = 0, 0
  end
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
    redis.call('SET', KEYS[i], string.format('%.0f:%d:%d', idxs[i], curs[i] + cost, prevs[i]),
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
