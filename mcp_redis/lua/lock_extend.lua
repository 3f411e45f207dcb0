-- Extend the lease of a lock held with ARGV[1].
--
-- KEYS[1] the lock; ARGV[1] token, ARGV[2] ms,
-- ARGV[3] "1": the lease becomes ARGV[2] | "0": ARGV[2] is added to what is left
-- Returns 1 when extended, 0 when the lock is not held with this token.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ms = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    ms = ms + left
  end
end
redis.call('PEXPIRE', KEYS[1], ms)
return 1
