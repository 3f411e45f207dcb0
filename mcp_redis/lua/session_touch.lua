-- Sliding expiry in write-through mode: extend a binding, but never shorten it unasked.
-- A shorter expiry must reach PostgreSQL (the source of truth) first, or read repair would
-- serve the binding again from PostgreSQL's longer expiry once Redis has let it go.
-- KEYS[1] binding (string: the agent id and its packed record)   ARGV[1] ttl ms
-- ARGV[2] optional agent id: set the expiry to ARGV[1] ms even when shorter, but only while
--         the binding still names ARGV[2] (called after PostgreSQL took the shorter expiry).
-- Reply: false (no binding, or it names another agent than ARGV[2]);
--        {agent id, 0, left, bound_at, bind_count}: the expiry is now ARGV[1] ms;
--        {agent id, 1, left, bound_at, bind_count}: left alone, ARGV[1] ms is shorter than what
--        it has left (no ARGV[2]). left: the ms the binding had left before (-1: no expiry;
--        0 with ARGV[2], not read). bound_at and bind_count (hex, the bind the binding is) are
--        absent for a bare agent id (a value written before records).
local value = redis.call('GET', KEYS[1])
if not value then
  return false
end
local agent, bound, count = string.match(value, '^(.*)\31(%x+)\31(%x+)\31%x+\31[^\31]*$')
agent = agent or value
local ttl = tonumber(ARGV[1])
local left = 0
if ARGV[2] then
  if agent ~= ARGV[2] then
    return false
  end
else
  left = redis.call('PTTL', KEYS[1])
  if left >= 0 and ttl < left then
    return {agent, 1, left, bound, count}
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {agent, 0, left, bound, count}
