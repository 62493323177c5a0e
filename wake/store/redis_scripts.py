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
# The token is max(fence + 1, server time in µs) (protocol.next_fence_token): a replica
# promoted after its master died may lack the last tokens issued, but its clock has
# moved on by the failover's seconds, so it never reissues one (unless the clocks are
# skewed by more than that). µs since 1970 (~1.7e15) stay exact in Lua's doubles (2^53).
ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local token = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, now_us)
  redis.call('SET', KEYS[2], string.format('%d', token))
  return token
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
#   KEYS[1] slots          ZSET holder -> slot expiry (ms)
#   KEYS[2] slot_tenant    HASH holder -> tenant
#   KEYS[3] queue          ZSET, every score 0, of entries `<#tenant>:<tenant><seq, 16 digits>`:
#                          by lex order each tenant's waiters are one range, oldest first
#                          (the length prefix keeps one tenant's range free of another's)
#   KEYS[4] waiting_until  ZSET holder -> hold deadline (ms); a ZSET so expiry is a range op
#   KEYS[5] queue_entry    HASH holder -> its entry in `queue`
#   KEYS[6] seq            counter: arrivals (the entries' seq) and turns
#   KEYS[7] bucket         HASH tokens, refilled (ms)
#   KEYS[8] tenants        ZSET tenant -> turn: the round-robin ring, tenants with waiters
#                          only; joining or being served takes a new turn (the back)
# Cost of an ask: O(T log W + S), T tenants waiting, W waiters, S slots held (at most
# max_concurrent_wakes), plus O(log W) per waiter or slot expired; never a walk of the
# whole queue.
_BUDGET = (
    _CLOCK
    + r"""
local SLOTS, SLOT_TENANT, QUEUE, WAITING_UNTIL = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local QUEUE_ENTRY, SEQ, BUCKET, TENANTS = KEYS[5], KEYS[6], KEYS[7], KEYS[8]

-- unpack() of a long list overflows Lua's C stack; go in chunks.
local function in_chunks(cmd, key, items)
  for i = 1, #items, 500 do
    redis.call(cmd, key, unpack(items, i, math.min(i + 499, #items)))
  end
end

-- A tenant's range in `queue` starts with this (no other tenant's prefix starts with it).
local function prefix(tenant)
  return #tenant .. ':' .. tenant
end

local function tenant_of(entry)
  local colon = string.find(entry, ':', 1, true)
  return string.sub(entry, colon + 1, colon + tonumber(string.sub(entry, 1, colon - 1)))
end

-- How many waiters `tenant` has.
local function queued(tenant)
  local p = prefix(tenant)
  return redis.call('ZLEXCOUNT', QUEUE, '[' .. p, '(' .. p .. '\255')
end

-- A tenant with no waiter left leaves the ring.
local function leave_ring_if_empty(tenant)
  if queued(tenant) == 0 then
    redis.call('ZREM', TENANTS, tenant)
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
    local entries, tenants = {}, {}
    for i = 1, #dead, 500 do
      local found = redis.call('HMGET', QUEUE_ENTRY, unpack(dead, i, math.min(i + 499, #dead)))
      for j = 1, #found do
        if found[j] then
          entries[#entries + 1] = found[j]
          tenants[tenant_of(found[j])] = true
        end
      end
    end
    in_chunks('HDEL', QUEUE_ENTRY, dead)
    if #entries > 0 then
      in_chunks('ZREM', QUEUE, entries)
    end
    for tenant in pairs(tenants) do
      leave_ring_if_empty(tenant)
    end
  end
end

-- budget._leave_queue
local function leave_queue(holder)
  local entry = redis.call('HGET', QUEUE_ENTRY, holder)
  if not entry then
    return
  end
  redis.call('ZREM', QUEUE, entry)
  redis.call('ZREM', WAITING_UNTIL, holder)
  redis.call('HDEL', QUEUE_ENTRY, holder)
  leave_ring_if_empty(tenant_of(entry))
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

-- budget._join_queue: behind its tenant's waiters, the tenant at the back of the ring
-- if new there; a waiter keeps its place, hold deadline and tenant.
local entry = redis.call('HGET', QUEUE_ENTRY, holder)
if entry then
  tenant = tenant_of(entry)
else
  local seq = redis.call('INCR', SEQ)
  entry = prefix(tenant) .. string.format('%016d', seq)
  redis.call('ZADD', QUEUE, 0, entry)
  redis.call('ZADD', WAITING_UNTIL, now + wait_ms, holder)
  redis.call('HSET', QUEUE_ENTRY, holder, entry)
  redis.call('ZADD', TENANTS, 'NX', seq, tenant)
end

local counts = tenant_counts()
local room = tenant_max - (counts[tenant] or 0)
if room <= 0 then
  return {0, 'tenant wakes', '0'}
end
local position = redis.call('ZLEXCOUNT', QUEUE, '[' .. prefix(tenant), '(' .. entry)

-- budget._ahead: the waiters round-robin serves first, a tenant ahead in the ring
-- min(waiters, room, position + 1), one behind min(waiters, room, position); a tenant
-- at its cap none. Stops once they fill every free slot.
local free = max_concurrent - redis.call('ZCARD', SLOTS)
local ahead = position
if ahead < free then
  local ring = redis.call('ZRANGE', TENANTS, 0, -1)
  local before = 1
  for i = 1, #ring do
    local other = ring[i]
    if other == tenant then
      before = 0
    else
      local room = tenant_max - (counts[other] or 0)
      if room > 0 then
        ahead = ahead + math.min(queued(other), room, position + before)
        if ahead >= free then
          break
        end
      end
    end
  end
end
if ahead >= free then
  return {0, 'concurrent wakes', '0'}
end
if position >= room then  -- older waiters of its own tenant take the tenant's room
  return {0, 'tenant wakes', '0'}
end

local tokens = refill(rate, now)
if tokens < 1 then
  return {0, 'wake rate', tostring((1 - tokens) / rate)}
end
redis.call('HSET', BUCKET, 'tokens', tokens - 1)
leave_queue(holder)
-- Served: a tenant with waiters left takes a new turn, at the back of the ring.
if redis.call('ZSCORE', TENANTS, tenant) then
  redis.call('ZADD', TENANTS, redis.call('INCR', SEQ), tenant)
end
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
return {redis.call('ZCARD', SLOTS), redis.call('ZCARD', QUEUE), tostring(tokens), flat}
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
