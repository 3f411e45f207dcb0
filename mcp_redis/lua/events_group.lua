-- Create a consumer group (and the stream, MKSTREAM) if missing; idempotent.
-- KEYS[1]  the stream
-- ARGV[1]  the group
-- ARGV[2]  the id the new group starts after ("0": the whole stream)
-- ARGV[3]  idle TTL in milliseconds (0: no TTL), set only if the key has none
-- Returns 1 if the group was created, 0 if it existed.
local reply = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
local created = 1
if type(reply) == 'table' and reply.err then
  if string.find(reply.err, 'BUSYGROUP', 1, true) then
    created = 0
  else
    return reply
  end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return created
