-- Undo a binding write that the source of truth may not have committed (its transaction failed
-- after Redis took the write; the COMMIT may even have succeeded with its reply lost): forget the
-- binding while it still holds what that write left, so the next read repairs it from the source,
-- whatever the source kept. A later writer's value is never touched.
-- KEYS[1] binding   ARGV[1] the value the failed write left
-- Reply: 1 when forgotten, 0 when the binding holds something else.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
