-- Drop index entries whose binding is gone or names another agent (single instance / Sentinel).
-- Guards against a concurrent rebind back to the same agent.
-- KEYS[1] the session index   KEYS[2..n] bindings
-- ARGV[1..n-1] the index members, "<agent id>\0<session key as index_id writes it>", one per binding
-- Reply: how many entries were dropped.
local dropped = 0
for i = 2, #KEYS do
  local member = ARGV[i - 1]
  local agent = string.match(member, '^(.*)%z[^%z]*$')
  local v = redis.call('GET', KEYS[i])
  local bound = v and (string.match(v, '^(.*)\31%x+\31%x+\31%x+\31[^\31]*$') or v)
  if bound ~= agent then
    dropped = dropped + redis.call('ZREM', KEYS[1], member)
  end
end
return dropped
