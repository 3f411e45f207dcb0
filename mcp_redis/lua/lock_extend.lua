-- Extend the lease of a lock held with ARGV[1].
--
-- KEYS[1] the lock; ARGV[1] the holder's value, ARGV[2] ms,
-- ARGV[3] "1": the lease becomes ARGV[2] (idempotent) | "0": ARGV[2] is added to what is left,
-- KEYS[2], ARGV[4] (with "0") this call's record (the lock's key, "#e", the
--         call's id: same hash tag, same slot) and how long (ms) to keep it:
--         this call retried after a lost reply finds it and adds nothing again.
--         Declared, not built here: in a Cluster slot being migrated, Redis
--         refuses a script's undeclared key that is not on the node yet.
-- Returns 1 when extended (or already extended by this call), 0 when the lock
-- is not held with this value.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ms = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  if KEYS[2] and not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[4]) then
    return 1
  end
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    ms = math.min(ms + left, 315360000000) -- never past ten years, however many additions
  end
end
redis.call('PEXPIRE', KEYS[1], ms)
return 1
