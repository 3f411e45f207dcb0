-- Write a session binding (the agent id with its record packed in one string) and index it.
-- KEYS[1] binding (string: see mcp_redis.sessions.records for the packed value)
-- KEYS[2] optional (not used by update): the session index (ZSET, score 0, members "<agent id>\0<session key as index_id writes it>");
--         without it (Cluster: another slot) the caller updates the index itself.
-- ARGV[1] mode   ARGV[2] agent id   ARGV[3] the session key as index_id writes it   ARGV[4] ttl ms
-- ARGV[5] bind: the caller's packed fields; put: the whole packed value; update: fields to merge;
--         refresh: 'keep-bare' or ''
-- ARGV[6] update: the most bytes the merged fields may take
-- Modes:
--   bind     SET a new record (bound_at = last_active = now, bind_count = previous + 1), PX ttl
--   put      SET ARGV[5] as it is, PX ttl (a record copied from the source of truth)
--   sync     as put, but a binding of the same agent that has longer to live keeps its TTL
--            (sliding touches run ahead of the source's throttled expiry)
--   refresh  only while the binding names ARGV[2]: last_active = now, KEEPTTL (sliding expiry);
--            a bare agent id becomes a record, unless ARGV[5] is 'keep-bare' (write-through)
--   update   only while bound (to ARGV[2] unless it is ""): merge fields, last_active = now, KEEPTTL
-- Reply: {previous value or false, new value}; false when refresh/update found no binding
-- (or another agent); {previous value, false} when the merged fields exceed ARGV[6];
-- sync: {previous value or false, new value, the binding's ms to live}.
-- Server time (TIME) stamps the record, so hosts with skewed clocks agree.
local US, RS = '\31', '\30'
local mode, agent = ARGV[1], ARGV[2]

local function parse(v)
  -- agent, bound_at, bind_count, last_active - bound_at, fields; nil for a bare agent id
  return string.match(v, '^(.*)\31(%x+)\31(%x+)\31(%x+)\31([^\31]*)$')
end

local function agent_of(v)
  local a = parse(v)
  return a or v
end

local old = redis.call('GET', KEYS[1])
local left -- sync: the binding's ms to live after the write
local now = tonumber(redis.call('TIME')[1])
local new
if mode == 'bind' then
  local count = 1
  if old then
    local a, _, n = parse(old)
    if a then count = tonumber(n, 16) + 1 end
  end
  new = agent .. US .. string.format('%x', now) .. US .. string.format('%x', count) .. US .. '0' .. US .. ARGV[5]
  redis.call('SET', KEYS[1], new, 'PX', ARGV[4])
elseif mode == 'put' then
  new = ARGV[5]
  redis.call('SET', KEYS[1], new, 'PX', ARGV[4])
elseif mode == 'sync' then
  local ttl = tonumber(ARGV[4])
  left = -2
  if old and agent_of(old) == agent then left = redis.call('PTTL', KEYS[1]) end
  new = ARGV[5]
  if left > ttl then
    redis.call('SET', KEYS[1], new, 'KEEPTTL')
  else
    left = ttl
    redis.call('SET', KEYS[1], new, 'PX', ttl)
  end
else
  if not old then return false end
  local a, bound, count, _, fields = parse(old)
  local bare = not a
  if bare then a, bound, count, fields = old, string.format('%x', now), '1', '' end
  if mode == 'refresh' or ARGV[2] ~= '' then
    if a ~= agent then return false end
  end
  agent = a
  if mode == 'refresh' and bare and ARGV[5] == 'keep-bare' then
    -- Write-through: a bare agent id (written before records) stays bare. A record stamped now
    -- would not be the bind the source of truth holds (a row from before records reads as bound
    -- at its created_at), and an expired row is caught up only from the bind Redis holds.
    new = old
  elseif mode == 'update' then
    local names, values = {}, {}
    local function add(packed)
      if packed == '' then return end
      local parts = {}
      for part in string.gmatch(packed .. RS, '([^\30]*)\30') do parts[#parts + 1] = part end
      for i = 1, #parts - 1, 2 do
        if values[parts[i]] == nil then names[#names + 1] = parts[i] end
        values[parts[i]] = parts[i + 1]
      end
    end
    add(fields)
    add(ARGV[5])
    local out = {}
    for _, name in ipairs(names) do
      out[#out + 1] = name .. RS .. values[name]
    end
    fields = table.concat(out, RS)
    if #fields > tonumber(ARGV[6]) then
      return {old, false}
    end
  end
  if new == nil then
    new = a .. US .. bound .. US .. count .. US .. string.format('%x', math.max(0, now - tonumber(bound, 16))) .. US .. fields
    redis.call('SET', KEYS[1], new, 'KEEPTTL')
  end
end

if KEYS[2] and mode ~= 'update' then
  redis.call('ZADD', KEYS[2], 0, agent .. '\0' .. ARGV[3])
  if old then
    local was = agent_of(old)
    if was ~= agent then
      redis.call('ZREM', KEYS[2], was .. '\0' .. ARGV[3])
    end
  end
  -- The index outlives every binding it lists: twice the ttl covers the touches that slide a
  -- binding between two throttled refreshes (the refresh interval is at most the ttl).
  local keep = 2 * (left or tonumber(ARGV[4]))
  if redis.call('PTTL', KEYS[2]) < keep then
    redis.call('PEXPIRE', KEYS[2], keep)
  end
end
if left then return {old or false, new, left} end
return {old or false, new}
