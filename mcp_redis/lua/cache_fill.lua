-- Write a freshly loaded value back into L2, but only if nobody invalidated
-- the entry since the loader started (the invalidate-during-load race).
-- KEYS[1] value key, KEYS[2] epoch key (same hash slot)
-- ARGV[1] epoch observed before loading (cache_begin.lua: an epoch, or the
-- load's marker; "" from versions before the marker), ARGV[2] envelope
-- JSON, ARGV[3] TTL in ms.  Returns 1 when written, 0 when refused.
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if string.byte(current, 1) == 109 then -- 'm': the load's own marker, done with
  redis.call('DEL', KEYS[2])
end
return 1
