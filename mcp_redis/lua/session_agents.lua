-- Cluster variant, part 2: record an agent id in the prefix indexes (both keys share a hash tag).
-- KEYS[1] agent-id lexical index (ZSET, score 0)   KEYS[2] agent horizon index (ZSET, score = horizon ms)
-- ARGV[1] agent id   ARGV[2] ttl ms   ARGV[3] index grace ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = tonumber(ARGV[2]) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('ZADD', KEYS[2], 'GT', now + horizon, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 64)
for _, agent in ipairs(dead) do
  redis.call('ZREM', KEYS[2], agent)
  redis.call('ZREM', KEYS[1], agent)
end
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < horizon then
    redis.call('PEXPIRE', KEYS[i], horizon)
  end
end
return 1
