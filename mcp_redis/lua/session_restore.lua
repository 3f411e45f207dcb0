-- Undo a binding write that the source of truth did not commit (its COMMIT failed after Redis
-- took the write): the previous value comes back with the expiry it had, while the binding
-- still holds what that write left (a later writer's value is never touched).
-- KEYS[1] binding
-- ARGV[1] the value the failed write left   ARGV[2] the previous value ('' : there was none)
-- ARGV[3] when the previous value would have expired (server ms; 0: none)
-- Reply: 1 when undone, 0 when the binding no longer holds ARGV[1].
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' or ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
else
  -- PXAT in the past: the key is gone at once, as the previous value would have been.
  redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
end
return 1
