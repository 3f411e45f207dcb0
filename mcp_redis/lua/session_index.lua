-- Cluster variant, part 1: score a session in its agent's index (one slot).
-- KEYS[1] the agent's session index (ZSET, score = horizon ms)
-- ARGV[1] session key   ARGV[2] ttl ms   ARGV[3] index grace ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = tonumber(ARGV[2]) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + horizon, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('PTTL', KEYS[1]) < horizon then
  redis.call('PEXPIRE', KEYS[1], horizon)
end
return 1
