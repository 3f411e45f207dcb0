-- Drop a session from an agent's index unless the binding names that agent again.
-- Guards against a concurrent rebind back to the same agent (single instance / Sentinel).
-- KEYS[1] binding   KEYS[2] the agent's session index
-- ARGV[1] agent id  ARGV[2] session key
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 0
end
return redis.call('ZREM', KEYS[2], ARGV[2])
