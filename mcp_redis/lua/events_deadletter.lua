-- Move entries that were delivered too often to a dead-letter stream, and ack them.
-- KEYS[1]  the stream
-- KEYS[2]  its dead-letter stream (same hash slot)
-- ARGV[1]  the group
-- ARGV[2]  MAXLEN of the dead-letter stream (approximate)
-- ARGV[3]  idle TTL of the dead-letter stream in milliseconds (0: none)
-- ARGV[4]  the consumer that gave up
-- ARGV[5..] the entry ids
-- Returns how many entries were acked.
local moved = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  local payload = ''
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if entry[1] then
    local fields = entry[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == 'e' then
        payload = fields[j + 1]
      end
    end
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', payload, 'id', id,
             'group', ARGV[1], 'consumer', ARGV[4])
  moved = moved + redis.call('XACK', KEYS[1], ARGV[1], id)
end
local ttl = tonumber(ARGV[3])
if ttl > 0 and #ARGV >= 5 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return moved
