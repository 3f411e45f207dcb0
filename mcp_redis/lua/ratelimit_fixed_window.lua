-- Fixed window, all limits of one call at once. A window is a counter key's
-- lifetime: it opens at the first admitted hit (PEXPIRE window) and the
-- server's own clock ends it, so no timestamp is stored or sent. Admitted
-- hits cost one INCRBY and one PTTL per limit; a refusal rolls back.
-- KEYS[i]: one integer counter per limit.
-- ARGV: cost (negative: peek, consume nothing), then limit_i, window_us_i.
-- Reply: "allowed refused-index(0 = none)" then, per limit,
--        " remaining retry_after_us reset_after_us" (integers, one string);
--        one limit admitted: the integer reset_after_ms * (limit + 1) + remaining.
-- (Comparing texts is cheaper than tonumber, a strtod: most calls cost '1'.)
local cost = ARGV[1] == '1' and 1 or tonumber(ARGV[1])
local limit1 = tonumber(ARGV[2])
if cost > 0 and #KEYS == 1 and limit1 < 1e14 then
  -- The common call, inline: one limit. Time left is in ms, so in the text
  -- reply, its text with '000' appended is the figure in us.
  local key = KEYS[1]
  local count
  if cost == 1 then count = redis.call('INCR', key) else count = redis.call('INCRBY', key, ARGV[1]) end
  local left
  if count == cost then -- a new window (or one refunded to zero: restart it)
    left = math.max(1, math.ceil(tonumber(ARGV[3]) / 1000))
    local ms = ARGV[3] -- as text when it can: a number argument costs Redis a sprintf
    if string.sub(ms, -3) == '000' then ms = string.sub(ms, 1, -4) else ms = left end
    redis.call('PEXPIRE', key, ms)
  else
    left = redis.call('PTTL', key)
    if left < 0 then -- never left without a TTL, whatever happened before
      left = math.max(1, math.ceil(tonumber(ARGV[3]) / 1000))
      redis.call('PEXPIRE', key, left)
    end
  end
  if count <= limit1 then
    -- An integer reply, no text to format: left_ms * (limit + 1) + remaining.
    local v = left * (limit1 + 1) + (limit1 - count)
    if v < 9e15 then return v end
    return '1 0 ' .. (limit1 - count) .. ' 0 ' .. left .. '000'
  end
  local before = count - cost
  if before == 0 then redis.call('DEL', key) else redis.call('DECRBY', key, cost) end
  -- The key still exists at its expiry millisecond: one more to be gone.
  return '0 1 ' .. (limit1 - before) .. ' ' .. (left + 1) .. '000 ' .. (before > 0 and left .. '000' or '0')
end
local consume = cost > 0
if not consume then cost = -cost end
local n = #KEYS
local out = {'1', 0}
local counts = {}
local refused, worst = 0, -1
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[2 * i])
  local window_ms = math.max(1, math.ceil(tonumber(ARGV[2 * i + 1]) / 1000))
  local count
  if consume then
    count = redis.call('INCRBY', key, cost) - cost
  else
    count = tonumber(redis.call('GET', key) or '0')
  end
  counts[i] = count
  local left = window_ms
  if count > 0 then
    left = redis.call('PTTL', key)
    if left < 0 then -- never left without a TTL, whatever happened before
      left = window_ms
      redis.call('PEXPIRE', key, left)
    end
  elseif consume then
    redis.call('PEXPIRE', key, window_ms)
  end
  local retry, reset = 0, 0
  if count > 0 then reset = left * 1000 end
  if count + cost > limit then
    -- The key still exists at its expiry millisecond: one more to be gone.
    retry = (left + 1) * 1000
    if retry > worst then worst, refused = retry, i end
  end
  out[3 * i], out[3 * i + 1], out[3 * i + 2] = limit - count, retry, reset
end

if refused > 0 then
  out[1], out[2] = '0', refused
  if consume then
    for i = 1, n do
      if counts[i] == 0 then
        redis.call('DEL', KEYS[i])
      else
        redis.call('DECRBY', KEYS[i], cost)
      end
    end
  end
elseif consume then
  for i = 1, n do
    out[3 * i] = out[3 * i] - cost
    if counts[i] == 0 then out[3 * i + 2] = math.max(1, math.ceil(tonumber(ARGV[2 * i + 1]) / 1000)) * 1000 end
  end
end
-- One bulk string, not an array: a client without hiredis parses it in one read.
-- %d, not Lua's own %.14g: slower, and inexact from 1e14 (windows reach 3e14 us).
for j = 2, #out do
  local v = out[j]
  if v == 0 then out[j] = '0' else out[j] = string.format('%d', v) end
end
return table.concat(out, ' ')
