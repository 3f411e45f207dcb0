-- Bind a session to an agent and index it, atomically (single instance / Sentinel).
-- KEYS[1] binding (string)            KEYS[2] the agent's session index (ZSET, score = horizon ms)
-- KEYS[3] agent-id lexical index (ZSET, score 0)   KEYS[4] agent horizon index (ZSET, score = horizon ms)
-- ARGV[1] agent id   ARGV[2] session key (index member)   ARGV[3] ttl ms   ARGV[4] index grace ms
-- ARGV[5] "bind": SET the binding (PX ttl) and return the previous agent id (or false).
--         "refresh": leave the binding alone; re-score the indexes only while the binding still
--         names ARGV[1]; returns ARGV[1] or false.
-- Server time (TIME) scores the indexes, so hosts with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local horizon = ttl + tonumber(ARGV[4])
local result
if ARGV[5] == 'refresh' then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return false
  end
  result = ARGV[1]
else
  result = redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl, 'GET')
end

local function keep_for(key, ms)
  -- a key's TTL only grows, and a key without one gets one
  local left = redis.call('PTTL', key)
  if left < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

redis.call('ZADD', KEYS[2], now + horizon, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
keep_for(KEYS[2], horizon)

redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 'GT', now + horizon, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 64)
for _, agent in ipairs(dead) do
  redis.call('ZREM', KEYS[4], agent)
  redis.call('ZREM', KEYS[3], agent)
end
keep_for(KEYS[3], horizon)
keep_for(KEYS[4], horizon)
return result
