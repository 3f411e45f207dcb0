-- Drop an agent from the prefix indexes once its session index holds no live entry.
-- A concurrent bind (one script) either ran before (the index has an entry: kept) or
-- runs after (it adds the agent back), so a bound agent is never dropped.
-- KEYS[1] the agent's session index   KEYS[2] agent-id lexical index   KEYS[3] agent horizon index
-- ARGV[1] agent id
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) > 0 then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
