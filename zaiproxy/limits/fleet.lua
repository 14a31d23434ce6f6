-- zaiproxy: every limit of a fleet in Redis, one atomic call per step.
--
-- docs/decisions/fleet-limits.md has the reasoning; zaiproxy/limits/fleet.py builds the calls.
-- The algorithms are the shared-memory ledger's (_native/README.md), in microseconds:
--   GCRA (requests/min, tokens/min, the adaptive rate): a string key holding the theoretical
--     arrival time (TAT); a cost takes ceil(cost * period / limit); refused while
--     TAT + increment - now > period, the exact wait being that excess;
--   concurrency: a sorted set of leases, member = the holder's lease id, score = its expiry;
--     expired leases are removed before every count, so a dead holder's slots come back;
--   rolling windows (5 h, week): a hash of 60 buckets by epoch ("<epoch>" -> count) plus
--     "t" (the live total) and "s" (the epoch swept through).
-- Every KEY of one call carries the same hash tag ({prefix}), so one call touches one slot.
--
-- ARGV[1] = command, ARGV[2] = now in microseconds, or "" for the server's TIME (the product
-- always sends ""; tests drive a virtual clock). Numbers are Lua doubles: microseconds since
-- the epoch (~1.8e15) and every product below stay far under 2^53, so they are exact.

local B = 60 -- window buckets
local cmd = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt(x) return string.format('%.0f', x) end

local function idiv(a, b) -- floor(a / b), exact for integers below 2^53
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function increment(cost, limit, period) -- ceil(cost * period / limit)
  local p = cost * period
  local q = idiv(p, limit)
  if q * limit < p then q = q + 1 end
  return q
end

-- ---- GCRA ----------------------------------------------------------------------------------
local function tat_of(key) return tonumber(redis.call('GET', key) or '0') end

local function tat_set(key, tat)
  if tat <= now then
    redis.call('DEL', key) -- equivalent: every reader takes max(TAT, now)
  else
    -- A minute of slack past the TAT: the key outlives every reader that could still see it.
    redis.call('SET', key, fmt(tat), 'PX', fmt(math.ceil((tat - now) / 1000) + 60000))
  end
end

local function gcra_check(key, cost, limit, period) -- (retry, new TAT)
  if cost > limit then return -1, 0 end
  local new = math.max(tat_of(key), now) + increment(cost, limit, period)
  if new - now > period then return new - period - now, 0 end
  return 0, new
end

local function gcra_charge(key, cost, limit, period)
  tat_set(key, math.max(tat_of(key), now) + increment(cost, limit, period))
end

local function gcra_give(key, cost, limit, period)
  local tat = tat_of(key) - increment(cost, limit, period)
  tat_set(key, math.max(tat, 0))
end

local function gcra_state(key, limit, period) -- (remaining units of cost 1, until fully reset)
  local used = math.max(tat_of(key), now) - now
  local room = period - used
  local remaining = 0
  if room > 0 then remaining = idiv(room * limit, period) end
  return remaining, used
end

-- ---- concurrency leases ------------------------------------------------------------------
local function leases_live(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
  return redis.call('ZCARD', key)
end

-- ---- rolling windows ---------------------------------------------------------------------
local function win_sweep(key, epoch)
  -- A window without "s" has no buckets (win_add sets it): nothing to sweep, nothing written.
  local s = tonumber(redis.call('HGET', key, 's') or '-1')
  if s < 0 or s >= epoch then return end
  do
    -- Every bucket field is in (s - B, s]: remove those that left the window.
    local gone = 0
    for e = math.max(s - B + 1, 0), math.min(s, epoch - B) do
      local c = redis.call('HGET', key, fmt(e))
      if c then
        gone = gone + tonumber(c)
        redis.call('HDEL', key, fmt(e))
      end
    end
    if gone > 0 then
      local t = tonumber(redis.call('HGET', key, 't') or '0')
      redis.call('HSET', key, 't', fmt(math.max(t - gone, 0)))
    end
  end
  redis.call('HSET', key, 's', fmt(epoch))
end

local function win_total(key) return tonumber(redis.call('HGET', key, 't') or '0') end

local function win_buckets(key) -- {epoch -> count}
  local flat = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f ~= 't' and f ~= 's' then out[tonumber(f)] = tonumber(flat[i + 1]) end
  end
  return out
end

local function win_check(key, cost, quota, period) -- (retry, epoch)
  if cost > quota then return -1, 0 end
  local bucket = idiv(period, B)
  local epoch = idiv(now, bucket)
  win_sweep(key, epoch)
  local t = win_total(key)
  if t <= quota - cost then return 0, epoch end
  local buckets = win_buckets(key)
  local freed = 0
  for d = B - 1, 0, -1 do
    local e = epoch - d
    local c = buckets[e]
    if e >= 0 and c then
      freed = freed + c
      if t - freed <= quota - cost then return (e + B) * bucket - now, 0 end
    end
  end
  return (epoch + B) * bucket - now, 0
end

local function win_add(key, cost, epoch, period)
  redis.call('HSETNX', key, 's', fmt(epoch)) -- a new window: swept through now
  redis.call('HINCRBY', key, 't', cost)
  redis.call('HINCRBY', key, fmt(epoch), cost)
  redis.call('PEXPIRE', key, fmt(idiv(period, 1000) + 60000))
end

local function win_charge(key, cost, period)
  local epoch = idiv(now, idiv(period, B))
  win_sweep(key, epoch)
  win_add(key, cost, epoch, period)
end

local function win_give(key, cost, epoch, period)
  if epoch < 0 or epoch <= idiv(now, idiv(period, B)) - B then return end
  local c = tonumber(redis.call('HGET', key, fmt(epoch)) or '0')
  local dec = math.min(c, cost)
  if dec <= 0 then return end
  redis.call('HINCRBY', key, fmt(epoch), -dec)
  redis.call('HSET', key, 't', fmt(math.max(win_total(key) - dec, 0)))
end

local function win_next_release(key, period) -- (until the total next drops, by how much)
  local bucket = idiv(period, B)
  local epoch = idiv(now, bucket)
  local buckets = win_buckets(key)
  for d = B - 1, 0, -1 do
    local e = epoch - d
    local c = buckets[e]
    if e >= 0 and c and c > 0 then return (e + B) * bucket - now, c end
  end
  return 0, 0
end

-- ---- the adaptive upstream rate: a GCRA whose rate is the fleet's published one ----------
local function adaptive_gcra(state_key) -- (limit, period) or nil when it does not limit
  local mrps = tonumber(redis.call('HGET', state_key, 'mrps') or '0')
  if mrps <= 0 then return nil end
  local limit = math.max(1, idiv(mrps, 1000))
  return limit, idiv(limit * 1000 * 1000000, mrps)
end

-- Op kinds (limits/fleet.py): 1 GCRA, 2 concurrency, 3 window, 4 adaptive GCRA, 5 counters.
local GCRA, CONC, WIN, ADAPTIVE, COUNTERS = 1, 2, 3, 4, 5
-- The fields of a key's usage hash, numbered from 1 (fleet.py's _COUNTER_FIELDS, the same list):
-- the token totals ('requests' = the requests charged), then the requests by outcome.
local COUNTER_FIELDS = {'requests', 'input_tokens', 'output_tokens', 'cache_read_tokens',
                        'cache_write_tokens', 'ok', 'proxy_429', 'zai_429', 'other_4xx', '5xx'}

-- Settles (and reconcile charges), from ARGV[pos] on: the number of entries, then each entry:
-- lease id, m, then m * (key index, kind, limit, period, delta, epoch); key index i names
-- KEYS[base + i]. A lease id releases the entry's concurrency ops ("" = none held); delta > 0
-- charges, < 0 refunds (GCRA, window); COUNTERS adds delta to field `limit` (1..#COUNTER_FIELDS)
-- of a usage hash, and fails the call on any other field number (a caller's bug, not data to
-- drop quietly). Returns the number of entries.
local function apply_settles(pos, base)
  local entries = tonumber(ARGV[pos])
  pos = pos + 1
  for _ = 1, entries do
    local member, m = ARGV[pos], tonumber(ARGV[pos + 1])
    pos = pos + 2
    for _ = 1, m do
      local key = KEYS[base + tonumber(ARGV[pos])]
      local kind, limit, period = tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2]),
          tonumber(ARGV[pos + 3])
      local delta, epoch = tonumber(ARGV[pos + 4]), tonumber(ARGV[pos + 5])
      pos = pos + 6
      if kind == CONC then
        if member ~= '' then redis.call('ZREM', key, member) end
      elseif kind == GCRA then
        if delta > 0 then gcra_charge(key, delta, limit, period)
        elseif delta < 0 then gcra_give(key, -delta, limit, period) end
      elseif kind == WIN then
        if delta > 0 then win_charge(key, delta, period)
        elseif delta < 0 then win_give(key, -delta, epoch, period) end
      elseif kind == COUNTERS then
        local name = COUNTER_FIELDS[limit]
        if not name then
          error('zaiproxy fleet script: no counter field ' .. tostring(limit))
        end
        if delta ~= 0 then redis.call('HINCRBY', key, name, delta) end
      end
    end
  end
  return entries
end

-- settle: ARGV[3..] the settles (apply_settles), key indexes from KEYS[1].
local function settle() return apply_settles(3, 0) end

-- admit: ARGV[3] lease id, ARGV[4] lease ttl, ARGV[5] n, then n * (kind, limit, period, cost);
-- then, optionally, the worker's queued settles carried along (one round trip for both):
-- their key base, then apply_settles' arguments. They are applied first (a lease they give
-- back is free for this admission). KEYS[i] is op i's key; an adaptive op's state hash is
-- KEYS[n + 1]; the settles' keys follow.
-- Returns {-1, 0, per op: epoch, remaining, reset} when everything was taken, or
-- {refused op (0-based), retry, per op: 0, remaining, reset} when nothing was.
local function admit()
  local member, ttl, n = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local carried = 6 + 4 * n
  if ARGV[carried] then apply_settles(carried + 1, tonumber(ARGV[carried])) end
  local aux, lim, per = {}, {}, {}
  local failed, retry = -1, 0
  for i = 1, n do
    local base = 5 + (i - 1) * 4
    local kind, limit, period, cost = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
        tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
    local key = KEYS[i]
    local r, a = 0, 0
    if kind == ADAPTIVE then
      local l, p = adaptive_gcra(KEYS[n + 1])
      if l then
        limit, period = l, p
        r, a = gcra_check(key, cost, limit, period)
      else
        limit = 0
      end
    elseif kind == GCRA then
      r, a = gcra_check(key, cost, limit, period)
    elseif kind == CONC then
      if leases_live(key) >= limit then r = 1 end
    else
      r, a = win_check(key, cost, limit, period)
    end
    aux[i], lim[i], per[i] = a, limit, period
    if r ~= 0 then failed, retry = i - 1, r; break end
  end
  local out = {failed, retry}
  for i = 1, n do
    local base = 5 + (i - 1) * 4
    local kind = tonumber(ARGV[base + 1])
    local key = KEYS[i]
    local epoch = 0
    if failed < 0 then
      if (kind == GCRA or kind == ADAPTIVE) and lim[i] > 0 then
        tat_set(key, aux[i])
      elseif kind == CONC then
        redis.call('ZADD', key, fmt(now + ttl), member)
        redis.call('PEXPIRE', key, fmt(math.ceil(ttl / 1000) * 2))
      elseif kind == WIN then
        epoch = aux[i]
        win_add(key, tonumber(ARGV[base + 4]), epoch, tonumber(ARGV[base + 3]))
      end
    end
    local remaining, reset = 0, 0
    if kind == GCRA then
      remaining, reset = gcra_state(key, tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]))
    end
    out[#out + 1] = epoch
    out[#out + 1] = remaining
    out[#out + 1] = reset
  end
  return out
end

-- renew: ARGV[3] ttl, then pairs (key index, lease id): live leases get a new expiry (XX:
-- a lease already expired and removed is not brought back).
local function renew()
  local ttl = tonumber(ARGV[3])
  local renewed = 0
  for pos = 4, #ARGV, 2 do
    local key = KEYS[tonumber(ARGV[pos])]
    renewed = renewed + redis.call('ZADD', key, 'XX', 'CH', fmt(now + ttl), ARGV[pos + 1])
    redis.call('PEXPIRE', key, fmt(math.ceil(ttl / 1000) * 2))
  end
  return renewed
end

-- state: ARGV[3] n, then n * (kind, limit, period); KEYS[i] op i's key (an adaptive op is
-- not reported). Returns per op three numbers: GCRA remaining, reset; CONC in use, 0;
-- WIN used, next release, releases; COUNTERS every field of COUNTER_FIELDS (ten numbers).
local function state()
  local n = tonumber(ARGV[3])
  local out = {now}
  for i = 1, n do
    local base = 3 + (i - 1) * 3
    local kind, limit, period = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
        tonumber(ARGV[base + 3])
    local key = KEYS[i]
    if kind == GCRA then
      local remaining, reset = gcra_state(key, limit, period)
      out[#out + 1] = remaining; out[#out + 1] = reset; out[#out + 1] = 0
    elseif kind == CONC then
      out[#out + 1] = leases_live(key); out[#out + 1] = 0; out[#out + 1] = 0
    elseif kind == WIN then
      win_sweep(key, idiv(now, idiv(period, B)))
      local release, releases = win_next_release(key, period)
      out[#out + 1] = win_total(key); out[#out + 1] = release; out[#out + 1] = releases
    else
      local values = redis.call('HMGET', key, unpack(COUNTER_FIELDS))
      for j = 1, #COUNTER_FIELDS do out[#out + 1] = tonumber(values[j] or '0') end
    end
  end
  return out
end

-- ---- the fleet's adaptive rate (limits/fleet_rate.py): one leader decides, all publish ---
local ACTIVITY = {'answers', 'concurrency', 'frequency', 'unknown', 'throttled_requests'}
local STATE = {'reset', 'mrps', 'ceiling_mrps', 'up', 'down', 'throttled_at_ms', 'reason', 'epoch'}

-- rate_tick: KEYS[1] the fleet's activity totals, KEYS[2] the leader lease, KEYS[3] the
-- published state. ARGV[3] pod id, ARGV[4] leader lease ms, ARGV[5] 1 = a reset was asked
-- on this pod, ARGV[6..10] this pod's activity since its last tick.
-- Returns {leader 0/1, the 5 activity totals, the 8 state numbers, the saved rate (JSON)}.
local function rate_tick()
  local pod, ttl = ARGV[3], ARGV[4]
  for i = 1, #ACTIVITY do
    local d = tonumber(ARGV[5 + i])
    if d ~= 0 then redis.call('HINCRBY', KEYS[1], ACTIVITY[i], d) end
  end
  if tonumber(ARGV[5]) > 0 then
    redis.call('HINCRBY', KEYS[3], 'reset', 1)
    redis.call('HSET', KEYS[3], 'mrps', 0) -- every pod stops limiting at once
  end
  local leader = 0
  local holder = redis.call('GET', KEYS[2])
  if holder == pod then
    redis.call('PEXPIRE', KEYS[2], ttl)
    leader = 1
  elseif not holder then
    redis.call('SET', KEYS[2], pod, 'PX', ttl)
    leader = 1
  end
  local out = {leader}
  local totals = redis.call('HMGET', KEYS[1], unpack(ACTIVITY))
  for i = 1, #ACTIVITY do out[#out + 1] = tonumber(totals[i] or '0') end
  local state = redis.call('HMGET', KEYS[3], unpack(STATE))
  for i = 1, #STATE do out[#out + 1] = tonumber(state[i] or '0') end
  out[#out + 1] = redis.call('HGET', KEYS[3], 'saved') or ''
  return out
end

-- rate_publish: KEYS[2] the leader lease, KEYS[3] the state; ARGV[3] pod id, ARGV[4..10]
-- mrps, ceiling_mrps, up, down, throttled_at_ms, reason, epoch; ARGV[11] the saved rate.
-- Written only while this pod still holds the lease.
local function rate_publish()
  if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
  for i = 2, #STATE do redis.call('HSET', KEYS[3], STATE[i], ARGV[2 + i]) end
  redis.call('HSET', KEYS[3], 'saved', ARGV[11])
  return 1
end

if cmd == 'admit' then return admit()
elseif cmd == 'rate_tick' then return rate_tick()
elseif cmd == 'rate_publish' then return rate_publish()
elseif cmd == 'settle' then return settle()
elseif cmd == 'renew' then return renew()
elseif cmd == 'state' then return state()
end
return redis.error_reply('zaiproxy fleet script: unknown command ' .. tostring(cmd))
