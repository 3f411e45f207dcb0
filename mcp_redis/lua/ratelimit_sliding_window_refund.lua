-- Refund of one admitted sliding-window call: remove exactly its log entries.
-- KEYS[i]: the call's lists (one per limit), as in the hit.
-- ARGV: cost, then limit_i, window_us_i, reset_us_i for each key (unused
--       here; same layout for every algorithm), then elapsed_us, then the
--       hit's 8-byte nonce (its entries are "<7-byte stamp><nonce>", all
--       `cost` of them the same string).
-- An entry still in the log is this call's own, so removing it gives back
-- exactly what the call took; one already trimmed had left the window
-- anyway. The entries are found newest first, in growing chunks (a refund
-- usually follows its hit closely). LREM keeps the key's TTL.
-- Reply: how many limits got units back.
local cost = tonumber(ARGV[1])
local n = #KEYS
local nonce = ARGV[3 + 3 * n]
local done = 0
for i = 1, n do
  local key = KEYS[i]
  local from, size, found = 0, 16, nil
  while not found do
    local chunk = redis.call('LRANGE', key, from, from + size - 1)
    for _, e in ipairs(chunk) do
      if string.sub(e, 8) == nonce then found = e break end
    end
    if #chunk < size then break end
    from, size = from + size, size * 4
  end
  if found and redis.call('LREM', key, cost, found) > 0 then done = done + 1 end
end
return done
