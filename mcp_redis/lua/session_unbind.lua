-- Remove a binding and its index entry (single instance / Sentinel).
-- KEYS[1] binding   KEYS[2] the session index   ARGV[1] the session key as index_id writes it
-- Reply: the removed value (packed record) or false.
local v = redis.call('GETDEL', KEYS[1])
if v then
  local agent = string.match(v, '^(.*)\31%x+\31%x+\31%x+\31[^\31]*$') or v
  redis.call('ZREM', KEYS[2], agent .. '\0' .. ARGV[1])
end
return v
