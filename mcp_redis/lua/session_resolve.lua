-- Distinct agent ids starting with a prefix, from the session index (not yet verified live).
-- KEYS[1] the session index (members "<agent id>\0<session key as index_id writes it>", score 0)
-- ARGV[1] prefix   ARGV[2] at most this many agents
-- Each step reads one member and jumps past that agent's entries: O(agents * log n).
-- A member can match a prefix that its agent id does not start with: agent "X" has members
-- "X\0<key>", which the prefix "X\0" matches. Such an agent is passed over; there are at most as
-- many as NULs in the prefix (each is the prefix cut before one of them).
local want = tonumber(ARGV[2])
local prefix = ARGV[1]
local found = {}
local low = '[' .. prefix
local high = '(' .. prefix .. '\255'
for _ = 1, want + #prefix do
  local page = redis.call('ZRANGEBYLEX', KEYS[1], low, high, 'LIMIT', 0, 1)
  if #page == 0 then
    return found
  end
  local agent = string.match(page[1], '^(.*)%z[^%z]*$') or page[1]
  if string.sub(agent, 1, #prefix) == prefix then
    found[#found + 1] = agent
    if #found == want then
      return found
    end
  end
  low = '(' .. agent .. '\0\255'
end
return found
