-- Extend the lease of a lock held with ARGV[1].
--
-- KEYS[1] the lock; ARGV[1] the holder's value, ARGV[2] ms,
-- ARGV[3] "1": the lease becomes ARGV[2] (idempotent) | "0": ARGV[2] is added to what is left,
-- ARGV[4], ARGV[5] (with "0") this call's id and how long (ms) to keep its record
--         KEYS[1] .. "#e" .. ARGV[4] (same hash tag, same slot): this call
--         retried after a lost reply finds the record and adds nothing again.
-- Returns 1 when extended (or already extended by this call), 0 when the lock
-- is not held with this value.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ms = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  if ARGV[4] and not redis.call('SET', KEYS[1] .. '#e' .. ARGV[4], '1', 'NX', 'PX', ARGV[5]) then
    return 1
  end
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    ms = ms + left
  end
end
redis.call('PEXPIRE', KEYS[1], ms)
return 1
