-- Refund of one admitted sliding-window call: remove exactly its log entries.
-- KEYS[i]: the call's sorted sets (one per limit), as in the hit.
-- ARGV: cost, then limit_i, window_us_i, reset_us_i for each key (unused
--       here; same layout for every algorithm), then elapsed_us, then the
--       hit's nonce (its entries are "<nonce>" or "<nonce>:<unit>").
-- An entry still in the log is this call's own, so removing it gives back
-- exactly what the call took; one already trimmed had left the window
-- anyway. ZREM keeps the key's TTL. Reply: how many limits got units back.
local cost = tonumber(ARGV[1])
local n = #KEYS
local nonce = ARGV[3 + 3 * n]
local done = 0
for i = 1, n do
  local removed = 0
  if cost == 1 then
    removed = redis.call('ZREM', KEYS[i], nonce)
  else
    local members = {}
    for j = 1, cost do
      members[#members + 1] = nonce .. ':' .. j
      if #members == 500 or j == cost then
        removed = removed + redis.call('ZREM', KEYS[i], unpack(members))
        members = {}
      end
    end
  end
  if removed > 0 then done = done + 1 end
end
return done
