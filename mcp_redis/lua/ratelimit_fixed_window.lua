-- Fixed window starting at a key's first admitted hit, all limits at once.
-- KEYS[i]: one string per limit: "<window start us>:<hits in it>".
-- ARGV: consume (1 = hit, 0 = peek), cost, now override in us (-1 = TIME),
--       then limit_i, window_us_i for each key.
-- Reply: {allowed, refused index (0 = none), then per limit:
--         remaining, retry_after_us, reset_after_us}.
local consume = ARGV[1] == '1'
local cost = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local n = #KEYS
local starts, counts = {}, {}
local out = {1, 0}
local refused, worst = 0, -1
for i = 1, n do
  local limit = tonumber(ARGV[2 + 2 * i])
  local window = tonumber(ARGV[3 + 2 * i])
  local v = redis.call('GET', KEYS[i])
  local start, count
  if v then
    local s, c = string.match(v, '^(%d+):(%d+)$')
    start, count = tonumber(s), tonumber(c)
  end
  if start == nil or now >= start + window then
    start, count = now, 0
  end
  starts[i], counts[i] = start, count
  local retry, reset = 0, 0
  if count > 0 then reset = start + window - now end
  if count + cost > limit then
    retry = start + window - now
    if retry > worst then worst, refused = retry, i end
  end
  out[3 * i], out[3 * i + 1], out[3 * i + 2] = limit - count, retry, reset
end

if refused > 0 then
  out[1], out[2] = 0, refused
elseif consume then
  for i = 1, n do
    local window = tonumber(ARGV[3 + 2 * i])
    local left = starts[i] + window - now
    redis.call('SET', KEYS[i], string.format('%.0f:%d', starts[i], counts[i] + cost),
               'PX', math.max(1, math.ceil(left / 1000)))
    out[3 * i] = out[3 * i] - cost
    out[3 * i + 2] = left
  end
end
return out
