-- Invalidate (ARGV[3] == "") or write through (ARGV[3] = envelope) one entry,
-- bumping its epoch so that any load already in flight cannot write back,
-- then tell every process to drop its L1 copy.
-- KEYS[1] value key, KEYS[2] epoch key (same hash slot)
-- ARGV[1] epoch TTL ms, ARGV[2] channel, ARGV[3] envelope or "",
-- ARGV[4] value TTL ms, ARGV[5] message.  Returns the new epoch.
-- The epoch never repeats, even after its key expired: it is at least the
-- server's clock in ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local epoch = string.format('%.0f', math.max(old + 1, now))
redis.call('SET', KEYS[2], epoch, 'PX', ARGV[1])
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
redis.call('PUBLISH', ARGV[2], ARGV[5])
return epoch
