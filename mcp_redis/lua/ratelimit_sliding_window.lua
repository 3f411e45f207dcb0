-- Exact sliding window (a log of hits), all limits of one call at once.
-- KEYS[i]: one sorted set per limit; each admitted unit of cost is a member
--          scored by the server time in microseconds and named "<nonce>"
--          (cost 1) or "<nonce>:<unit>": the nonce is unique per caller
--          and call, so members never collide, even within one microsecond.
-- ARGV: cost (negative: peek, consume nothing), then limit_i, window_us_i for
--       each key, then the nonce, then optionally the time in us (tests simulate a clock).
-- A call retried with the same nonce (its reply was lost) is counted once.
-- Reply: "allowed refused-index(0 = none)" then, per limit,
--        " remaining retry_after_us reset_after_us" (integers, one string).
-- Speed: this runs on every check, so the admitted path makes five calls
-- (TIME, trim, count, add, expire) and turns one number into text.
local fmt = string.format

local cost = tonumber(ARGV[1])
local consume = cost > 0
if not consume then cost = -cost end
local n = #KEYS
local now = tonumber(ARGV[3 + 2 * n])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end
local nonce = ARGV[2 + 2 * n]
local counts = {}
local out = {'1', '0'}
local refused, worst = 0, -1
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local edge = fmt('%.0f', now - window)
  local count
  if consume then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', edge)
    count = redis.call('ZCARD', key)
  else
    count = redis.call('ZCOUNT', key, '(' .. edge, '+inf')
  end
  counts[i] = count
  local retry, reset = 0, 0
  if count > 0 and (count + cost > limit or not consume) then
    -- Admitted hits skip this: their own entry is the newest.
    reset = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2] + window - now
  end
  if count + cost > limit then
    -- The hit fits once the (count + cost - limit)-th oldest live entry leaves.
    local e = redis.call('ZRANGEBYSCORE', key, '(' .. edge, '+inf', 'WITHSCORES', 'LIMIT', count + cost - limit - 1, 1)
    retry = e[2] + window - now
    if retry > worst then worst, refused = retry, i end
  end
  out[3 * i], out[3 * i + 1], out[3 * i + 2] = limit - count, retry, reset
end

if refused > 0 and consume
   and redis.call('ZSCORE', KEYS[1], cost == 1 and nonce or nonce .. ':1') then
  -- This very call was admitted before (a retry after a lost reply): its
  -- entries are in every log already, so it stays admitted, counted once.
  refused = 0
  for i = 1, n do
    out[3 * i], out[3 * i + 1], out[3 * i + 2] = tonumber(ARGV[2 * i]) - counts[i], 0, 0
    if counts[i] > 0 then  -- a short window's log may be empty by now
      out[3 * i + 2] = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')[2] + ARGV[2 * i + 1] - now
    end
  end
elseif refused > 0 then
  out[1], out[2] = '0', refused
  for i = 1, n do
    if consume and counts[i] > 0 and counts[i] + cost <= tonumber(ARGV[2 * i]) then
      out[3 * i + 2] = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')[2] + ARGV[2 * i + 1] - now
    end
  end
elseif consume then
  local stamp = fmt('%.0f', now)
  for i = 1, n do
    local key = KEYS[i]
    local window = ARGV[2 * i + 1]
    -- NX: a retried call's entries keep their first score and are not
    -- added twice; `added` (0 then) keeps `remaining` exact.
    local added
    if cost == 1 then
      added = redis.call('ZADD', key, 'NX', stamp, nonce)
    else
      local prefix = nonce .. ':'
      local args, batch = {'NX'}, 0
      added = 0
      for j = 1, cost do
        args[#args + 1] = stamp
        args[#args + 1] = prefix .. j
        batch = batch + 1
        if batch == 500 or j == cost then
          added = added + redis.call('ZADD', key, unpack(args))
          args, batch = {'NX'}, 0
        end
      end
    end
    redis.call('PEXPIRE', key, math.ceil(window / 1000))
    out[3 * i] = out[3 * i] - added
    out[3 * i + 2] = window  -- the newest entry is this hit's: the text as sent
  end
end
-- One bulk string, not an array: a client without hiredis parses it in one read.
-- %d, not Lua's own %.14g: slower, and inexact from 1e14 (windows reach 3e14 us).
-- Texts (the constants, a window as sent) are already what the reply needs.
for j = 2, #out do
  local v = out[j]
  if type(v) == 'number' then
    if v == 0 then out[j] = '0' else out[j] = fmt('%d', v) end
  end
end
return table.concat(out, ' ')
