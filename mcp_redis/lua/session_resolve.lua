-- Distinct agent ids starting with a prefix, from the session index (not yet verified live).
-- KEYS[1] the session index (members "<agent id>\0<session key as index_id writes it>", score 0)
-- ARGV[1] prefix   ARGV[2] at most this many agents
-- Each step reads one member and jumps past that agent's entries: O(agents * log n).
local want = tonumber(ARGV[2])
local found = {}
local low = '[' .. ARGV[1]
local high = '(' .. ARGV[1] .. '\255'
for _ = 1, want do
  local page = redis.call('ZRANGEBYLEX', KEYS[1], low, high, 'LIMIT', 0, 1)
  if #page == 0 then
    return found
  end
  local agent = string.match(page[1], '^(.*)%z[^%z]*$') or page[1]
  found[#found + 1] = agent
  low = '(' .. agent .. '\0\255'
end
return found
