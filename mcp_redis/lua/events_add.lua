-- Append events to a stream, bounded in length and refreshing its idle TTL.
-- KEYS[1]  the stream
-- ARGV[1]  MAXLEN (approximate trimming: "MAXLEN ~")
-- ARGV[2]  idle TTL in milliseconds (0: no TTL)
-- ARGV[3..] one JSON payload per event, stored in the field "e"
-- Returns the new entry ids, in order.
local ids = {}
for i = 3, #ARGV do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return ids
