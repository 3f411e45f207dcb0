-- Exact sliding window (a log of hits), all limits of one call at once.
-- KEYS[i]: one list per limit, newest entry first. Each admitted unit is one
--          15-byte entry: the server time in microseconds (7 bytes, big
--          endian) then the call's 8-byte nonce (unique per caller and
--          call), so a call's entries are its own and can be found again.
-- ARGV: cost (negative: peek, consume nothing), then limit_i, window_us_i for
--       each key, then the nonce (a 9th byte marks a retried call), then
--       optionally the time in us (tests simulate a clock).
-- A call retried with the same nonce (its reply was lost) is counted once.
-- Reply: "allowed refused-index(0 = none)" then, per limit,
--        " remaining retry_after_us reset_after_us" (integers, one string);
--        one limit admitted: the integer `remaining` (reset_after = window).
-- Speed: the admitted path makes four calls (TIME, the oldest entry, the
-- push, the TTL) and formats one number: expired entries leave from the
-- tail, each once, so the log holds live entries only and its length is the
-- count. The general path below handles several limits, costs, peeks,
-- retries and trimming.
local fmt, pack, unpack_ = string.format, struct.pack, struct.unpack

local cost = tonumber(ARGV[1])
if cost == 1 and #KEYS == 1 and #ARGV[4] == 8 then
  -- The common call, inline: one limit, one unit, a first attempt.
  local key, limit, window = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])
  local now = tonumber(ARGV[5])
  if not now then
    local t = redis.call('TIME')
    now = t[1] * 1000000 + t[2]
  end
  local oldest = redis.call('LINDEX', key, -1)
  if limit < 1e14 and (not oldest or unpack_('>I7', oldest) > now - window) then
    -- Every entry is live, so the length is the count.
    local len = redis.call('LPUSH', key, pack('>I7', now) .. ARGV[4])
    if len <= limit then
      -- The TTL in ms as text: a number argument costs Redis a sprintf.
      local ms = ARGV[3]
      if string.sub(ms, -3) == '000' then ms = string.sub(ms, 1, -4) else ms = math.ceil(window / 1000) end
      redis.call('PEXPIRE', key, ms)
      -- An integer reply, no text to format: `remaining` (reset is the window).
      return limit - len
    end
    redis.call('LPOP', key)
    -- Full: the oldest entry is the limit-th newest; it has to leave first.
    local count = len - 1
    local edge = oldest
    if count ~= limit then edge = redis.call('LINDEX', key, limit - 1) end
    return '0 1 ' .. (limit - count) .. ' ' .. fmt('%d', unpack_('>I7', edge) + window - now) .. ' '
           .. fmt('%d', unpack_('>I7', redis.call('LINDEX', key, 0)) + window - now)
  end
end
local consume = cost > 0
if not consume then cost = -cost end
local n = #KEYS
local now = tonumber(ARGV[3 + 2 * n])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end
local nonce = ARGV[2 + 2 * n]
local retried = #nonce > 8
if retried then nonce = string.sub(nonce, 1, 8) end

local function stamp(e)
  return (unpack_('>I7', e))
end

-- Drop the expired entries (a suffix: the log is in time order): look at the
-- oldest, then gallop towards the head and bisect, so k expired entries cost
-- O(log k) reads and one LTRIM.
local function trim(key, edge)
  local e = redis.call('LINDEX', key, -1)
  if not e or stamp(e) > edge then return end
  local k, step, hi = 1, 1, nil
  while true do
    local j = k + step
    local x = redis.call('LINDEX', key, -j)
    if not x or stamp(x) > edge then hi = j break end
    k, step = j, step * 2
  end
  while hi - k > 1 do
    local mid = math.floor((k + hi) / 2)
    local x = redis.call('LINDEX', key, -mid)
    if not x or stamp(x) > edge then hi = mid else k = mid end
  end
  redis.call('LTRIM', key, 0, -k - 1)
end

-- The first of this call's entries in a log, or nil (scans newest first).
local function find(key)
  local from, size = 0, 16
  while true do
    local chunk = redis.call('LRANGE', key, from, from + size - 1)
    for _, e in ipairs(chunk) do
      if string.sub(e, 8) == nonce then return e end
    end
    if #chunk < size then return nil end
    from, size = from + size, size * 4
  end
end

local windows, limits, lens = {}, {}, {}
for i = 1, n do
  limits[i] = tonumber(ARGV[2 * i])
  windows[i] = tonumber(ARGV[2 * i + 1])
  trim(KEYS[i], now - windows[i])
end

local function figures(out, i, count, admitted)
  -- remaining, retry, reset of limit i with `count` live entries (none added).
  local key, limit, window = KEYS[i], limits[i], windows[i]
  local retry, reset = 0, 0
  if count > 0 then
    reset = stamp(redis.call('LINDEX', key, 0)) + window - now
  end
  if not admitted and count + cost > limit then
    -- The hit fits once the (count + cost - limit)-th oldest entry leaves.
    retry = stamp(redis.call('LINDEX', key, limit - cost)) + window - now
  end
  out[3 * i], out[3 * i + 1], out[3 * i + 2] = limit - count, retry, reset
  return retry
end

local function reply(out)
  -- One bulk string, not an array: a client without hiredis parses it in one read.
  -- %d, not Lua's own %.14g: inexact from 1e14 (windows reach 3e14 us).
  for j = 3, #out do
    local v = out[j]
    if type(v) == 'number' then
      if v == 0 then out[j] = '0' else out[j] = fmt('%d', v) end
    end
  end
  return table.concat(out, ' ')
end

if consume and retried and find(KEYS[1]) then
  -- This very call was admitted before (its reply was lost): its entries are
  -- in every log already, so it stays admitted, counted once.
  local out = {'1', '0'}
  for i = 1, n do figures(out, i, redis.call('LLEN', KEYS[i]), true) end
  return reply(out)
end

if not consume then
  local out = {'1', '0'}
  local refused, worst = 0, -1
  for i = 1, n do
    local retry = figures(out, i, redis.call('LLEN', KEYS[i]), false)
    if retry > worst and retry > 0 then worst, refused = retry, i end
  end
  if refused > 0 then out[1], out[2] = '0', refused end
  return reply(out)
end

-- Consume: push first (LPUSH answers the new length), undo if any limit is over.
local entry = pack('>I7', now) .. nonce
local over = false
for i = 1, n do
  local len
  if cost == 1 then
    len = redis.call('LPUSH', KEYS[i], entry)
  else
    local args, batch = {}, 0
    for j = 1, cost do
      batch = batch + 1
      args[batch] = entry
      if batch == 500 or j == cost then
        len = redis.call('LPUSH', KEYS[i], unpack(args, 1, batch))
        batch = 0
      end
    end
  end
  lens[i] = len
  if len > limits[i] then over = true end
end

if not over then
  local out = {'1', '0'}
  for i = 1, n do
    local window = ARGV[2 * i + 1]
    redis.call('PEXPIRE', KEYS[i], math.ceil(windows[i] / 1000))
    -- The newest entry is this hit's: reset is the window, the text as sent.
    out[3 * i], out[3 * i + 1], out[3 * i + 2] = limits[i] - lens[i], '0', window
  end
  return reply(out)
end

local out = {'0', 0}
local refused, worst = 0, -1
for i = 1, n do
  local key = KEYS[i]
  local count = lens[i] - cost
  if count == 0 then redis.call('DEL', key) else redis.call('LTRIM', key, cost, -1) end
  local retry = figures(out, i, count, false)
  if retry > worst and retry > 0 then worst, refused = retry, i end
end
out[2] = fmt('%d', refused)
return reply(out)
