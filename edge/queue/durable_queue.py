"""The durable queue of requests that must not be lost: one Redis Stream per app.

Keys carry the app's hash tag like the wake store's (`edge:{app}:...`):
`queue` (the stream, consumer group `replay`), `dead` (dead letters), `attempts`
(HASH id -> deliveries tried), `key:<dedupe key>` (the dedupe record: the first
queued id, then `<id> delivered` once delivered; it lives `retention` from the first
arrival, and that one record decides both whether a resend is a duplicate and
whether an entry was delivered, so the two can never disagree), `replayer` +
`replayer_fence` (the lease of the one edge replaying the app, so per-app order
holds while several edges share the apps; its value is `<owner>#<token>`, and every
replay write checks it in the same script, so an edge whose lease lapsed and was
taken over can no longer read (claim), begin, dead-letter or expire anything).

Every call is bounded in time and any Redis failure raises `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec

from edge.queue.replica_ack import ReplicaAck, not_replicated_reason, replicated, wait_timeout_ms
from wake.store.protocol import Lease, StoreUnavailable
from wake.store.redis_connection import (
    bounded_client,
    close_client,
    guarded,
    info_everywhere,
    on_one_connection,
)

GROUP = "replay"
NO_ACK = ReplicaAck()  # the master's acknowledgement is enough
PURGE_PAGE = 500

# KEYS: queue, dedupe. ARGV: retention_ms, max_queued, method, path, head, body, key,
# arrived, touch. {'new', id} | {'dup', first id} | {'full', ''}. With touch ('1': a
# WAIT follows), a duplicate rewrites its record as it is: a write of this connection
# after the entry's own, so WAIT's count covers the entry even when another connection
# (a first try answered 503) wrote it.
_ENQUEUE = """
local record = redis.call('GET', KEYS[2])
if record then
  if ARGV[9] == '1' then redis.call('SET', KEYS[2], record, 'KEEPTTL') end
  return {'dup', string.match(record, '^%S+')}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'replay', '0', 'MKSTREAM')
elseif redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  return {'full', ''}
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[3], 'p', ARGV[4], 'head', ARGV[5],
  'b', ARGV[6], 'k', ARGV[7], 't', ARGV[8])
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return {'new', id}
"""

# The replayer lease: value `<owner>#<token>`, the token from the app's fence counter
# (seeded from server time, so tokens stay above any issued before a data loss).
# KEYS: lease, fence. ARGV: owner, ttl_ms. The new token, or 0 if held.
_ACQUIRE_REPLAYER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local now = redis.call('TIME')
  redis.call('SET', KEYS[2], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '#' .. token, 'PX', ARGV[2])
return token
"""

# KEYS: lease. ARGV: lease value, ttl_ms. 1 if renewed (still ours), else 0.
_RENEW_REPLAYER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: lease value. Deleted only if still ours.
_RELEASE_REPLAYER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The fence every replay write starts with: LOST (-2) unless the lease is `value`.
_FENCE = """
local LOST = -2
local function ours(lease, value)
  return redis.call('GET', lease) == value
end
"""

# KEYS: queue, lease. ARGV: consumer, claim_idle_ms, count, lease value. The next
# entries for the lease holder: its own pending ones, else ones another consumer left
# idle for claim_idle (claimed), else, only once nothing is pending (per-app order),
# new ones. {'ok', entries} (ids of deleted entries acked away), {'wait'} while others
# hold pending entries not yet idle, or {'lost'}: reading claims entries, so it is a
# replay write too.
_NEXT_BATCH = (
    _FENCE
    + """
if not ours(KEYS[2], ARGV[4]) then return {'lost'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'ok', {}} end
local function usable(raw)
  local out, gone = {}, {}
  for _, e in ipairs(raw) do
    if e[2] then table.insert(out, e) else table.insert(gone, e[1]) end
  end
  if #gone > 0 then redis.call('XACK', KEYS[1], 'replay', unpack(gone)) end
  return out
end
local function read(from)
  local r = redis.call('XREADGROUP', 'GROUP', 'replay', ARGV[1], 'COUNT', ARGV[3],
    'STREAMS', KEYS[1], from)
  if not r then return {} end
  return usable(r[1][2])
end
local entries = read('0')
if #entries > 0 then return {'ok', entries} end
-- Redis 7 answers {cursor, entries, deleted ids}; 6.2 has no third part.
local claimed = redis.call('XAUTOCLAIM', KEYS[1], 'replay', ARGV[1], ARGV[2], '0-0',
  'COUNT', ARGV[3])
entries = usable(claimed[2])
if #entries > 0 then return {'ok', entries} end
if redis.call('XPENDING', KEYS[1], 'replay')[1] > 0 then return {'wait'} end
return {'ok', read('>')}
"""
)

# Shared by the scripts below: an entry leaves the queue (acked, deleted, its attempt
# count dropped); `begin` counts a delivery attempt, or retires an entry its dedupe
# record marks delivered, or one purged, answering 0. Only the record of this very id
# retires it: an entry accepted as new (its own record) is always delivered.
_ENTRY_LIB = (
    _FENCE
    + """
local function retire(queue, attempts, id)
  redis.call('XACK', queue, 'replay', id)
  redis.call('XDEL', queue, id)
  redis.call('HDEL', attempts, id)
end
-- Keeps the dead letters to `max` exactly: drops the oldest (at most 1000 per call, so
-- a lowered cap never makes one long script), returning each as {id, queued_id, key,
-- reason} so the edge can count and log every one.
local function cap_dead(dead, max)
  local over = math.min(redis.call('XLEN', dead) - tonumber(max), 1000)
  if over <= 0 then return {} end
  local gone = {}
  for _, e in ipairs(redis.call('XRANGE', dead, '-', '+', 'COUNT', over)) do
    local f, queued_id, key, reason = e[2], '', '', ''
    for i = 1, #f, 2 do
      if f[i] == 'queued_id' then queued_id = f[i + 1]
      elseif f[i] == 'k' then key = f[i + 1]
      elseif f[i] == 'reason' then reason = f[i + 1] end
    end
    table.insert(gone, {e[1], queued_id, key, reason})
  end
  redis.call('XTRIM', dead, 'MAXLEN', redis.call('XLEN', dead) - #gone)
  return gone
end
local function begin(queue, record, attempts, id)
  if redis.call('GET', record) == id .. ' delivered'
      or #redis.call('XRANGE', queue, id, id) == 0 then
    retire(queue, attempts, id)
    return 0
  end
  return redis.call('HINCRBY', attempts, id, 1)
end
"""
)

# KEYS: queue, record, attempts, lease. ARGV: id, lease value. This delivery's attempt
# number, 0 (delivered already), or LOST.
_BEGIN = (
    _ENTRY_LIB
    + """
if not ours(KEYS[4], ARGV[2]) then return LOST end
return begin(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
"""
)

# KEYS: queue, record, attempts, lease[, next record]. ARGV: id, lease value[, next id].
# Delivered: the dedupe record marked and the ack in one step, so no edge can die
# between them. The record keeps its lifetime (KEEPTTL): it still ends `retention`
# after the first arrival; one gone already is not revived. With a next entry, also
# its `begin` (saving a round trip and an fsync): returns its attempt number
# (0: delivered already), else -1. A holder that lost its lease still records the
# delivery it made (the app has acted on it: a new holder must not send it again)
# but begins nothing: LOST.
_FINISH = (
    _ENTRY_LIB
    + """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1] .. ' delivered', 'KEEPTTL')
end
retire(KEYS[1], KEYS[3], ARGV[1])
if not ours(KEYS[4], ARGV[2]) then return LOST end
if not ARGV[3] then return -1 end
return begin(KEYS[1], KEYS[5], KEYS[3], ARGV[3])
"""
)

# KEYS: queue, dead, attempts, lease. ARGV: id, reason, status, attempts, max dead
# letters, lease value. Moves the entry; the dead letters keep the newest `max dead
# letters`. Returns {moved (0 or 1), the dead letters dropped}, or {LOST}.
_DEAD_LETTER = (
    _ENTRY_LIB
    + """
if not ours(KEYS[4], ARGV[6]) then return {LOST} end
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 1 then
  local fields = found[1][2]
  table.insert(fields, 'queued_id')
  table.insert(fields, ARGV[1])
  table.insert(fields, 'reason')
  table.insert(fields, ARGV[2])
  table.insert(fields, 'status')
  table.insert(fields, ARGV[3])
  table.insert(fields, 'attempts')
  table.insert(fields, ARGV[4])
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
retire(KEYS[1], KEYS[3], ARGV[1])
return {#found, cap_dead(KEYS[2], ARGV[5])}
"""
)

# KEYS: queue, dead, attempts, lease. ARGV: retention_ms, count, max dead letters,
# lease value. Moves up to `count` entries queued longer than the retention (by server
# time) to the dead letters as "expired". Returns {how many it moved, the dead letters
# dropped}. With a lease value: {LOST} unless it is ours. Without one (''): nothing
# while another edge holds the lease, whose replayer expires entries itself.
_EXPIRE = (
    _ENTRY_LIB
    + """
if ARGV[4] ~= '' and not ours(KEYS[4], ARGV[4]) then return {LOST} end
if ARGV[4] == '' and redis.call('EXISTS', KEYS[4]) == 1 then return {0, {}} end
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
if cutoff <= 0 then return {0, {}} end
local old = redis.call('XRANGE', KEYS[1], '-', tostring(cutoff), 'COUNT', ARGV[2])
for _, e in ipairs(old) do
  local fields = e[2]
  local attempts = redis.call('HGET', KEYS[3], e[1]) or '0'
  local extra = {'queued_id', e[1], 'reason', 'expired', 'status', '0', 'attempts', attempts}
  for _, v in ipairs(extra) do
    table.insert(fields, v)
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  retire(KEYS[1], KEYS[3], e[1])
end
return {#old, cap_dead(KEYS[2], ARGV[3])}
"""
)

# KEYS: dead, queue, dedupe. ARGV: dead id, retention_ms. The new queued id, or ''.
_REQUEUE = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return '' end
local f = found[1][2]
local keep = {}
for i = 1, #f, 2 do
  local name = f[i]
  if name == 'm' or name == 'p' or name == 'head' or name == 'b' or name == 'k' or name == 't' then
    table.insert(keep, name)
    table.insert(keep, f[i + 1])
  end
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], 'replay', '0', 'MKSTREAM')
end
local id = redis.call('XADD', KEYS[2], '*', unpack(keep))
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], id, 'PX', ARGV[2])
return id
"""


class QueuedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A queued request as stored: the upstream head exactly as the app would have got it."""

    id: str
    method: str
    path: str
    head: bytes
    body: bytes
    key: str
    arrived: float
    # Dead letters only.
    queued_id: str = ""
    reason: str = ""
    status: int = 0
    attempts: int = 0


class QueuedSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What the admin API lists (bodies stay in Redis)."""

    id: str
    method: str
    path: str
    key: str
    arrived: float
    body_bytes: int
    attempts: int = 0
    queued_id: str = ""
    reason: str = ""
    status: int = 0


class DroppedDeadLetter(msgspec.Struct, frozen=True):
    """A dead letter dropped to keep the app's max_dead_letters: its ids, key and reason."""

    id: str
    queued_id: str
    key: str
    reason: str


def _dropped(raw: list) -> list[DroppedDeadLetter]:
    return [DroppedDeadLetter(*(_text(v) for v in item)) for item in raw]


class Enqueued(msgspec.Struct, frozen=True):
    id: str
    duplicate: bool


class QueueFull(Exception):
    """The app's queue holds max_queued requests."""


class NotReplicated(StoreUnavailable):
    """Queued, but fewer replicas than asked confirmed it in time: the entry stays (and
    may be delivered); a resend with its dedupe key maps to it."""

    def __init__(self, reason: str, entry_id: str) -> None:
        super().__init__(reason)
        self.entry_id = entry_id


class LeaseLost(Exception):
    """The replayer lease lapsed and is no longer ours: this edge must stop replaying."""


LOST = -2  # what a fenced script answers when the lease is not ours


def lease_value(lease: Lease) -> str:
    """What the lease key holds while `lease` is current: owner and fencing token."""
    return f"{lease.owner}#{lease.token}"


def _fenced(app: str, result: int) -> int:
    if result == LOST:
        raise LeaseLost(f"app {app}: the replayer lease is no longer ours")
    return result


def id_ms(stream_id: str) -> int:
    """The Redis server time (ms) a stream id was created at."""
    return int(stream_id.partition("-")[0])


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as a script returns them (name, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _entry(stream_id: bytes | str, fields: dict[bytes, bytes]) -> QueuedRequest:
    return QueuedRequest(
        id=_text(stream_id),
        method=_text(fields.get(b"m")),
        path=_text(fields.get(b"p")),
        head=fields.get(b"head", b""),
        body=fields.get(b"b", b""),
        key=_text(fields.get(b"k")),
        arrived=float(fields.get(b"t", b"0")),
        queued_id=_text(fields.get(b"queued_id")),
        reason=_text(fields.get(b"reason")),
        status=int(fields.get(b"status", b"0")),
        attempts=int(fields.get(b"attempts", b"0")),
    )


def summary(entry: QueuedRequest, attempts: int | None = None) -> QueuedSummary:
    return QueuedSummary(
        id=entry.id,
        method=entry.method,
        path=entry.path,
        key=entry.key,
        arrived=entry.arrived,
        body_bytes=len(entry.body),
        attempts=entry.attempts if attempts is None else attempts,
        queued_id=entry.queued_id,
        reason=entry.reason,
        status=entry.status,
    )


class DurableQueue:
    """Per-app request queues in Redis, shared by every worker and edge of a region."""

    def __init__(
        self, url: str, *, key_prefix: str = "edge", op_timeout: float = 5.0, max_connections=32
    ) -> None:
        self._prefix = key_prefix
        self._op_timeout = op_timeout
        self._redis = bounded_client(url, decode_responses=False, max_connections=max_connections)
        r = self._redis
        self._enqueue = r.register_script(_ENQUEUE)
        self._next_batch = r.register_script(_NEXT_BATCH)
        self._begin = r.register_script(_BEGIN)
        self._finish = r.register_script(_FINISH)
        self._dead_letter = r.register_script(_DEAD_LETTER)
        self._requeue = r.register_script(_REQUEUE)
        self._expire = r.register_script(_EXPIRE)
        self._acquire_lease = r.register_script(_ACQUIRE_REPLAYER)
        self._renew_lease = r.register_script(_RENEW_REPLAYER)
        self._release_lease = r.register_script(_RELEASE_REPLAYER)
        self._closed = False

    def key(self, app: str, name: str) -> str:
        return f"{self._prefix}:{{{app}}}:{name}"

    def _guard(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        return guarded(what, self._op_timeout, self._closed)

    # -------------------------------------------------------------- front side

    async def enqueue(
        self,
        app: str,
        *,
        method: bytes,
        path: bytes,
        head: bytes,
        body: bytes,
        key: str,
        arrived: float,
        retention: float,
        max_queued: int,
        ack: ReplicaAck = NO_ACK,
    ) -> Enqueued:
        """Append once per dedupe key; returns after Redis acknowledged the write, and
        with `ack.replicas`, after that many replicas confirmed the entry (else raises
        NotReplicated; a duplicate waits for them too)."""
        keys = [self.key(app, "queue"), self.key(app, f"key:{key}")]
        args = [
            round(retention * 1000),
            max_queued,
            method,
            path,
            head,
            body,
            key,
            repr(arrived),
            "1" if ack.replicas else "0",
        ]
        async with self._guard("enqueue"):
            if ack.replicas:
                kind, stream_id = await self._enqueue_replicated(app, keys, args, ack)
            else:
                kind, stream_id = await self._enqueue(keys, args)
        if kind == b"full":
            raise QueueFull(f"app {app} has {max_queued} requests queued")
        return Enqueued(_text(stream_id), kind == b"dup")

    async def _enqueue_replicated(
        self, app: str, keys: list[str], args: list[Any], ack: ReplicaAck
    ) -> tuple[bytes, bytes]:
        """The enqueue script then WAIT, back to back on one connection to the master of
        the app's slot: WAIT counts the replicas that have that connection's writes (and
        cannot run inside Lua), so on any other connection it would confirm nothing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._op_timeout  # the guard's own bound
        millis = wait_timeout_ms(ack.timeout, deadline - loop.time())
        if millis is None:
            raise NotReplicated(not_replicated_reason(app, 0, ack.replicas, None), "")
        # EVAL, not EVALSHA: a master new since a failover has no script cached, and a
        # NOSCRIPT would cost the WAIT behind it a whole timeout before a second batch.
        call = ("EVAL", self._enqueue.script, len(keys), *keys, *args)
        answer = await on_one_connection(
            self._redis, keys[0], [call, ("WAIT", ack.replicas, millis)], deadline
        )
        for result in answer:
            if isinstance(result, Exception):
                raise result
        kind, stream_id = answer[0]
        if kind != b"full" and not replicated(int(answer[1]), ack.replicas):
            reason = not_replicated_reason(app, int(answer[1]), ack.replicas, millis)
            raise NotReplicated(reason, _text(stream_id))
        return kind, stream_id

    # ----------------------------------------------------------- replay side

    async def depth(self, app: str) -> tuple[int, int]:
        """(queued, dead-lettered) for the app."""
        async with self._guard("depth"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.xlen(self.key(app, "queue"))
            pipe.xlen(self.key(app, "dead"))
            queued, dead = await pipe.execute()
        return int(queued), int(dead)

    async def server_ms(self) -> int:
        async with self._guard("time"):
            seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def acquire_replayer(self, app: str, owner: str, ttl: float) -> Lease | None:
        keys = [self.key(app, "replayer"), self.key(app, "replayer_fence")]
        async with self._guard("acquire_replayer"):
            token = int(await self._acquire_lease(keys, [owner, max(1, round(ttl * 1000))]))
        return Lease(owner, token) if token else None

    async def renew_replayer(self, app: str, lease: Lease, ttl: float) -> bool:
        """Extend the lease if it is still `lease` (same owner and token)."""
        async with self._guard("renew_replayer"):
            renewed = await self._renew_lease(
                [self.key(app, "replayer")], [lease_value(lease), max(1, round(ttl * 1000))]
            )
        return bool(renewed)

    async def release_replayer(self, app: str, lease: Lease) -> None:
        async with self._guard("release_replayer"):
            await self._release_lease([self.key(app, "replayer")], [lease_value(lease)])

    async def next_batch(
        self, app: str, consumer: str, claim_idle: float, count: int, lease: Lease
    ) -> list[QueuedRequest] | None:
        """The next entries for the replayer holding the app's lease, oldest first.

        Its own unfinished entries come first, then entries another consumer read
        and left idle for `claim_idle`; new entries only once nothing is pending,
        so per-app order holds. None: others hold pending entries not yet idle.
        Raises LeaseLost, reading and claiming nothing, when `lease` is not the app's.
        """
        keys = [self.key(app, "queue"), self.key(app, "replayer")]
        args = [consumer, max(1, round(claim_idle * 1000)), count, lease_value(lease)]
        async with self._guard("next_batch"):
            answer = await self._next_batch(keys, args)
        if answer[0] == b"lost":
            raise LeaseLost(f"app {app}: the replayer lease is no longer ours")
        if answer[0] == b"wait":
            return None
        entries = [_entry(stream_id, _pairs(fields)) for stream_id, fields in answer[1]]
        return sorted(entries, key=lambda e: tuple(int(p) for p in e.id.split("-")))

    def _entry_keys(self, app: str, entry: QueuedRequest) -> list[str]:
        return [
            self.key(app, "queue"),
            self.key(app, f"key:{entry.key}"),
            self.key(app, "attempts"),
            self.key(app, "replayer"),
        ]

    async def begin(self, app: str, entry: QueuedRequest, lease: Lease) -> int:
        """This delivery's attempt number; 0 when it was delivered already (now acked).
        Raises LeaseLost, counting nothing, when `lease` is no longer the app's."""
        async with self._guard("begin"):
            result = int(
                await self._begin(self._entry_keys(app, entry), [entry.id, lease_value(lease)])
            )
        return _fenced(app, result)

    async def finish(
        self, app: str, entry: QueuedRequest, lease: Lease, then: QueuedRequest | None = None
    ) -> int | None:
        """Delivered: mark its dedupe record delivered and ack, atomically; with `then`,
        also `begin` that entry and return its attempt number. Raises LeaseLost after
        recording the delivery when `lease` is no longer the app's."""
        keys = self._entry_keys(app, entry)
        args: list[str | int] = [entry.id, lease_value(lease)]
        if then is not None:
            keys.append(self.key(app, f"key:{then.key}"))
            args.append(then.id)
        async with self._guard("finish"):
            attempt = _fenced(app, int(await self._finish(keys, args)))
        return attempt if then is not None else None

    def _dead_keys(self, app: str) -> list[str]:
        names = ("queue", "dead", "attempts", "replayer")
        return [self.key(app, name) for name in names]

    async def dead_letter(
        self,
        app: str,
        entry: QueuedRequest,
        lease: Lease,
        reason: str,
        status: int,
        attempts: int,
        max_dead: int,
    ) -> list[DroppedDeadLetter]:
        """Move the entry to the dead letters; the oldest dead letters dropped to keep
        `max_dead`. Raises LeaseLost, moving nothing, when `lease` is not the app's."""
        args = [entry.id, reason, status, attempts, max_dead, lease_value(lease)]
        async with self._guard("dead_letter"):
            result = await self._dead_letter(self._dead_keys(app), args)
        _fenced(app, int(result[0]))
        return _dropped(result[1])

    async def expire(
        self,
        app: str,
        retention: float,
        max_dead: int,
        lease: Lease | None = None,
        count: int = 100,
    ) -> tuple[int, list[DroppedDeadLetter]]:
        """Dead-letter up to `count` entries queued longer than `retention`: how many, and
        the oldest dead letters dropped to keep `max_dead`. Without `lease`, only while no
        edge replays the app; with it, raises LeaseLost unless it is the app's."""
        value = lease_value(lease) if lease is not None else ""
        args = [round(retention * 1000), count, max_dead, value]
        async with self._guard("expire"):
            result = await self._expire(self._dead_keys(app), args)
        moved = _fenced(app, int(result[0]))
        return moved, _dropped(result[1])

    # -------------------------------------------------------------- operators

    async def list(self, app: str, which: str, count: int) -> list[QueuedSummary]:
        """Queued ("queued") or dead-lettered ("dead") requests, oldest first."""
        stream = self.key(app, "queue" if which == "queued" else "dead")
        async with self._guard("list"):
            raw = await self._redis.xrange(stream, count=count)
            entries = [_entry(stream_id, fields) for stream_id, fields in raw]
            attempts: dict[bytes, bytes] = {}
            if which == "queued" and entries:
                attempts = await self._redis.hgetall(self.key(app, "attempts"))
        if which == "queued":
            return [summary(e, int(attempts.get(e.id.encode(), 0))) for e in entries]
        return [summary(e) for e in entries]

    async def requeue_dead(self, app: str, dead_id: str, retention: float) -> str | None:
        """Put a dead letter back at the end of the queue; its new id, or None if unknown."""
        dead = self.key(app, "dead")
        async with self._guard("requeue_dead"):
            found = await self._redis.xrange(dead, dead_id, dead_id)
            if not found:
                return None
            key = _entry(*found[0]).key
            keys = [dead, self.key(app, "queue"), self.key(app, f"key:{key}")]
            new_id = await self._requeue(keys, [dead_id, round(retention * 1000)])
        return _text(new_id) or None

    async def purge(self, app: str, which: str, entry_id: str = "") -> int:
        """Delete one entry, or all, of the queue or the dead letters; the count removed.

        A purged request's dedupe record goes too, so a resend is queued afresh rather
        than answered with the id of a request that is gone.
        """
        stream = self.key(app, "queue" if which == "queued" else "dead")
        removed = 0
        start, end = (entry_id, entry_id) if entry_id else ("-", "+")
        while True:  # in pages, so a large queue is never read into memory at once
            async with self._guard("purge"):
                page = await self._redis.xrange(stream, start, end, count=PURGE_PAGE)
                entries = [_entry(i, f) for i, f in page]
                pipe = self._redis.pipeline(transaction=False)
                for entry in entries:
                    pipe.delete(self.key(app, f"key:{entry.key}"))
                    pipe.xdel(stream, entry.id)
                    if which == "queued":
                        pipe.xack(stream, GROUP, entry.id)
                        pipe.hdel(self.key(app, "attempts"), entry.id)
                await pipe.execute()
            removed += len(entries)
            if entry_id or len(entries) < PURGE_PAGE:
                return removed
            start = "(" + entries[-1].id

    async def aof_enabled(self) -> bool:
        """Whether the server (on a cluster: every node) persists with AOF."""
        async with self._guard("info"):
            infos = await info_everywhere(self._redis, "persistence")
        return all(int(info.get("aof_enabled", 0)) for info in infos)

    async def fewest_replicas(self) -> int:
        """The fewest replicas connected to a master (the server, or every cluster master)."""
        async with self._guard("info"):
            infos = await info_everywhere(self._redis, "replication")
        masters = [info for info in infos if info.get("role") == "master"]
        return min((int(info.get("connected_slaves", 0)) for info in masters), default=0)

    async def close(self) -> None:
        self._closed = True
        await close_client(self._redis)


__all__ = [
    "DroppedDeadLetter",
    "DurableQueue",
    "Enqueued",
    "LeaseLost",
    "QueueFull",
    "QueuedRequest",
    "QueuedSummary",
    "StoreUnavailable",
    "id_ms",
]
