-- Cluster: index a binding whose slot was just written (session_bind.lua does this itself on a
-- single server or Sentinel): add its entry and keep the index at least ARGV[2] ms, in one
-- call, so a node that stops answering between the two can never leave the index without a TTL.
-- KEYS[1] the session index (ZSET, score 0)   ARGV[1] the member "<agent id>\0<session key>"
-- ARGV[2] ms the index must live at least (twice the binding's ttl, as session_bind.lua)
redis.call('ZADD', KEYS[1], 0, ARGV[1])
local keep = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
return 1
