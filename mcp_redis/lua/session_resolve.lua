-- Agent ids starting with a prefix whose latest binding has not expired (lexicographic range).
-- KEYS[1] agent-id lexical index   KEYS[2] agent horizon index
-- ARGV[1] min (inclusive "[prefix")   ARGV[2] max (exclusive "(prefix\xff")   ARGV[3] at most this many
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[3])
local found = {}
local offset = 0
for _ = 1, 20 do
  local page = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', offset, 64)
  for _, agent in ipairs(page) do
    local horizon = redis.call('ZSCORE', KEYS[2], agent)
    if horizon and tonumber(horizon) > now then
      found[#found + 1] = agent
      if #found >= want then
        return found
      end
    end
  end
  if #page < 64 then
    return found
  end
  offset = offset + 64
end
return found
