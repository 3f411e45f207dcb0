-- invalidate_all: move a namespace to a new generation (baked into every
-- data key, so the old entries become unreachable and simply expire).
-- KEYS[1] generation key; ARGV[1] its TTL ms, ARGV[2] channel,
-- ARGV[3] message prefix (the new generation is appended, then "}").
-- Generations never repeat, even after the key expired: each is at least
-- the server's clock in ms.  Returns the new generation.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local gen = string.format('%.0f', math.max(old + 1, now))
redis.call('SET', KEYS[1], gen, 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3] .. gen .. '"}')
return gen
