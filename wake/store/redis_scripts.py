"""Lua for redis:// — every multi-step store operation runs atomically inside Redis.

Kept as Python strings (not .lua files) so they ship with the package without any
package-data configuration. Conventions shared by all scripts:

- Every key a script touches is passed in KEYS, and all KEYS of one script share a
  hash tag (`{app}` or `{budget}`), so each script hits one Cluster slot.
- Time is Redis server time (`TIME`) in milliseconds with microsecond fractions:
  the store's single clock, so edges with skewed clocks agree on every deadline.
  Scripts call TIME before writing; Redis >= 5 replicates scripts by effects,
  so that is allowed and replicas see the resulting values, not a re-run.
- Fractional results go back as strings: Redis truncates Lua numbers to integers
  in replies.
"""

from __future__ import annotations

# Shared by every script that reads the clock.
_CLOCK = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

# --------------------------------------------------------------------------- lease

# KEYS: lease, fence. ARGV: owner, ttl_ms. Returns the new fencing token, or 0 if held.
ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    -- Seeded from server time: tokens stay above any issued before a data loss.
    local now = redis.call('TIME')
    redis.call('SET', KEYS[2], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
  end
  return redis.call('INCR', KEYS[2])
end
return 0
"""

# KEYS: lease. ARGV: owner, ttl_ms. 1 if renewed (owner still holds it), else 0.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: owner. Deletes the lease only if `owner` holds it.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# --------------------------------------------------------------------------- state

# KEYS: fence, state (HASH data/token/version). ARGV: state JSON, token.
# Refused (0) when a newer token was issued; otherwise the new version.
WRITE_STATE = """
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[2]) < fence then
  return 0
end
local version = redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('HSET', KEYS[2], 'data', ARGV[1], 'token', ARGV[2])
return version
"""

# KEYS: seen. Stores the server time in ms.
TOUCH = (
    _CLOCK
    + """
redis.call('SET', KEYS[1], now_ms())
return 1
"""
)

# KEYS: seen. Milliseconds since the last touch (as a string), or nil if never.
IDLE_FOR = (
    _CLOCK
    + """
local seen = redis.call('GET', KEYS[1])
if not seen then
  return false
end
return tostring(now_ms() - tonumber(seen))
"""
)

# --------------------------------------------------------------------------- budget

# The steps of wake/budget.py, over these keys (all tagged {budget}):
#   KEYS[1] slots           ZSET holder -> slot expiry (ms)
#   KEYS[2] slot_tenant     HASH holder -> tenant
#   KEYS[3] waiting         ZSET holder -> arrival sequence (FIFO order)
#   KEYS[4] waiting_until   ZSET holder -> hold deadline (ms); a ZSET so expiry is a range op
#   KEYS[5] waiting_tenant  HASH holder -> tenant
#   KEYS[6] seq             arrival counter
#   KEYS[7] bucket          HASH tokens, refilled (ms)
_BUDGET = (
    _CLOCK
    + """
local SLOTS, SLOT_TENANT, WAITING = KEYS[1], KEYS[2], KEYS[3]
local WAITING_UNTIL, WAITING_TENANT, SEQ, BUCKET = KEYS[4], KEYS[5], KEYS[6], KEYS[7]

-- unpack() of a long list overflows Lua's C stack; go in chunks.
local function in_chunks(cmd, key, items)
  for i = 1, #items, 500 do
    redis.call(cmd, key, unpack(items, i, math.min(i + 499, #items)))
  end
end

-- budget.expire: drop slots whose lease ran out and waiters past their deadline.
local function expire(now)
  local dead = redis.call('ZRANGEBYSCORE', SLOTS, '-inf', now)
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', SLOTS, '-inf', now)
    in_chunks('HDEL', SLOT_TENANT, dead)
  end
  dead = redis.call('ZRANGEBYSCORE', WAITING_UNTIL, '-inf', now)
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', WAITING_UNTIL, '-inf', now)
    in_chunks('ZREM', WAITING, dead)
    in_chunks('HDEL', WAITING_TENANT, dead)
  end
end

local function leave_queue(holder)
  redis.call('ZREM', WAITING, holder)
  redis.call('ZREM', WAITING_UNTIL, holder)
  redis.call('HDEL', WAITING_TENANT, holder)
end

-- Slots held per tenant (slots are few: at most max_concurrent_wakes).
local function tenant_counts()
  local counts = {}
  local flat = redis.call('HGETALL', SLOT_TENANT)
  for i = 2, #flat, 2 do
    counts[flat[i]] = (counts[flat[i]] or 0) + 1
  end
  return counts
end

-- budget._refill: a full bucket on first use, burst max(1, rate).
local function refill(rate, now)
  local burst = math.max(1, rate)
  local stored = redis.call('HMGET', BUCKET, 'tokens', 'refilled')
  local tokens = tonumber(stored[1])
  local refilled = tonumber(stored[2]) or 0
  if tokens == nil then
    tokens = burst
  elseif now > refilled then
    tokens = math.min(burst, tokens + (now - refilled) / 1000 * rate)
  end
  if now > refilled then
    refilled = now
  end
  redis.call('HSET', BUCKET, 'tokens', tokens, 'refilled', refilled)
  return tokens
end
"""
)

# ARGV: holder, tenant, max_concurrent, rate, tenant_max, slot_ttl_ms, wait_for_ms.
# Returns {granted 0/1, reason, retry_after seconds as a string}.
ACQUIRE_BUDGET = (
    _BUDGET
    + """
local holder, tenant = ARGV[1], ARGV[2]
local max_concurrent, rate = tonumber(ARGV[3]), tonumber(ARGV[4])
local tenant_max, ttl_ms, wait_ms = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
expire(now)

-- Asking again while holding a slot renews it (idempotent grant).
if redis.call('ZSCORE', SLOTS, holder) then
  redis.call('ZADD', SLOTS, now + ttl_ms, holder)
  redis.call('HSET', SLOT_TENANT, holder, tenant)
  return {1, '', '0'}
end

-- Join the queue once; a waiter keeps its first arrival and its hold deadline.
if not redis.call('ZSCORE', WAITING, holder) then
  redis.call('ZADD', WAITING, redis.call('INCR', SEQ), holder)
  redis.call('ZADD', WAITING_UNTIL, now + wait_ms, holder)
  redis.call('HSET', WAITING_TENANT, holder, tenant)
end

local counts = tenant_counts()
if (counts[tenant] or 0) >= tenant_max then
  return {0, 'tenant wakes', '0'}
end

-- Waiters ahead count only if their tenant has room (a full tenant blocks no one);
-- stop counting once they already fill every free slot.
local free = max_concurrent - redis.call('ZCARD', SLOTS)
local ahead = 0
local rank = redis.call('ZRANK', WAITING, holder)
local start = 0
while start < rank and ahead < free do
  local stop = math.min(start + 199, rank - 1)
  local others = redis.call('ZRANGE', WAITING, start, stop)
  local tenants = redis.call('HMGET', WAITING_TENANT, unpack(others))
  for i = 1, #others do
    if (counts[tenants[i]] or 0) < tenant_max then
      ahead = ahead + 1
    end
  end
  start = stop + 1
end
if ahead >= free then
  return {0, 'concurrent wakes', '0'}
end

local tokens = refill(rate, now)
if tokens < 1 then
  return {0, 'wake rate', tostring((1 - tokens) / rate)}
end
redis.call('HSET', BUCKET, 'tokens', tokens - 1)
leave_queue(holder)
redis.call('ZADD', SLOTS, now + ttl_ms, holder)
redis.call('HSET', SLOT_TENANT, holder, tenant)
return {1, '', '0'}
"""
)

# ARGV: holder, slot_ttl_ms. 1 if the slot was still held (and is extended), else 0.
RENEW_BUDGET = (
    _BUDGET
    + """
local now = now_ms()
expire(now)
if not redis.call('ZSCORE', SLOTS, ARGV[1]) then
  return 0
end
redis.call('ZADD', SLOTS, now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# ARGV: holder. Gives back the slot or leaves the queue.
RELEASE_BUDGET = (
    _BUDGET
    + """
redis.call('ZREM', SLOTS, ARGV[1])
redis.call('HDEL', SLOT_TENANT, ARGV[1])
leave_queue(ARGV[1])
return 1
"""
)

# ARGV: rate. Returns {in_use, waiting, tokens as a string, {tenant, count, ...}}.
BUDGET_USAGE = (
    _BUDGET
    + """
local now = now_ms()
expire(now)
local flat = {}
for tenant, count in pairs(tenant_counts()) do
  flat[#flat + 1] = tenant
  flat[#flat + 1] = count
end
local tokens = refill(tonumber(ARGV[1]), now)
return {redis.call('ZCARD', SLOTS), redis.call('ZCARD', WAITING), tostring(tokens), flat}
"""
)

# --------------------------------------------------------------------------- gallery

# KEYS: counts (HASH key -> n), writer (last batch seq added). ARGV: seq, writer ttl (s),
# then key, n pairs. Adds the batch unless the writer's seq already reached it (a resend).
ADD_COUNTS = """
local seq = tonumber(ARGV[1])
if seq <= tonumber(redis.call('GET', KEYS[2]) or '0') then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""
