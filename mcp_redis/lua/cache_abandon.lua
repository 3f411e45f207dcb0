-- A load that writes nothing back (the loader raised, returned a value JSON
-- cannot hold or None uncached, or took too long) takes its marker away
-- (cache_begin.lua), unless an invalidation replaced it meanwhile.
-- KEYS[1] epoch key; ARGV[1] the marker.  Returns 1 when it was deleted.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
