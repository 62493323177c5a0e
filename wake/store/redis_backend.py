"""redis:// — the wake store shared by every worker and edge host of a region
(one server, or a Redis Cluster with redis+cluster://).

Keys (prefix `edge` by default) carry a hash tag, so every script touches one
Cluster slot:
- per app: `edge:{app}:lease` (owner, PX ttl), `edge:{app}:fence` (last token issued),
  `edge:{app}:state` (HASH data/token/version), `edge:{app}:seen` (server ms),
  channel `edge:{app}:changed` (sharded pub/sub on a cluster, see `_listen`);
- region budget: `edge:{budget}:slots|slot_tenant|queue|waiting_until|
  queue_entry|seq|bucket|tenants` (see wake/store/redis_scripts.py);
- journal: the capped stream `edge:{journal}`;
- gallery counters: the HASH `edge:{gallery}:counts`, and `edge:{gallery}:writer:<id>`
  (the last batch seq each counting process added, so a resend adds nothing).

Every call is bounded (socket timeouts plus an overall per-call deadline) and any
Redis failure surfaces as `StoreUnavailable`, so callers can answer 503 instead of
hanging. Waiters of one app share a single poller and the store shares a single
pub/sub connection, so thousands of waiters cost a few hundred polls per interval
and one extra Redis connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable

import msgspec
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPubSub

from scheduler_client import backoff
from scheduler_client.task_stop import stop_tasks
from wake.budget import BudgetDecision, BudgetLimits, BudgetUsage
from wake.store import redis_scripts
from wake.store.protocol import AppWakeState, Lease, StoreUnavailable, Transition
from wake.store.redis_connection import bounded_client, close_client, guarded, is_cluster

log = logging.getLogger(__name__)

JOURNAL_LIMIT = 10_000
# A gallery counter writer's last batch seq is kept this long (s) after its last batch:
# far longer than any resend, and a process restarted is a new writer anyway.
COUNT_WRITER_TTL = 86_400
# Journal entries fetched per round trip when filtering by app.
_JOURNAL_PAGE = 500
_MAX_U64 = 2**64 - 1
PUBSUB_RETRY_MIN = 0.05
PUBSUB_RETRY_MAX = 2.0
# How long a cluster node's reader blocks per read (s): a message ends the read at once,
# so this only bounds how soon a reader notices its node's subscriptions are gone.
SHARDED_READ_WAIT = 1.0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _before(stream_id: str) -> str | None:
    """The largest stream ID below `stream_id` (exclusive ranges without Redis 6.2's `(`)."""
    ms, _, seq = stream_id.partition("-")
    if int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    if int(ms) > 0:
        return f"{int(ms) - 1}-{_MAX_U64}"
    return None


class _Watch:
    """One app's shared poller: its latest state, fanned out to every local waiter."""

    __slots__ = ("changed", "error", "kick", "results", "state", "stopped", "task", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.state: AppWakeState | None = None
        self.error: StoreUnavailable | None = None
        self.results = 0  # poll results so far; a waiter only heeds errors newer than its arrival
        self.changed = asyncio.Event()  # replaced after each set, so waiters grab the current one
        self.kick = asyncio.Event()  # a notification arrived: poll now
        self.stopped = False
        self.task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class _Session:
    """One cluster pub/sub session; its node readers stop once it is over (not only on a
    cancellation, which a redis-py call can lose)."""

    __slots__ = ("over",)

    def __init__(self) -> None:
        self.over = False


class RedisStore:
    """WakeStore over Redis: Lua scripts for atomic steps, server time as the clock."""

    def __init__(
        self,
        url: str,
        *,
        journal_limit: int = JOURNAL_LIMIT,
        key_prefix: str = "edge",
        poll_interval: float = 0.25,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        op_timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key_prefix {key_prefix!r} must not contain braces (hash tags)")
        self._prefix = key_prefix
        self._journal_limit = journal_limit
        self._poll_interval = poll_interval
        self._op_timeout = op_timeout
        self._redis = bounded_client(
            url,
            decode_responses=True,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
        )
        r = self._redis
        self._acquire_lease = r.register_script(redis_scripts.ACQUIRE_LEASE)
        self._renew_lease = r.register_script(redis_scripts.RENEW_LEASE)
        self._release_lease = r.register_script(redis_scripts.RELEASE_LEASE)
        self._write_state = r.register_script(redis_scripts.WRITE_STATE)
        self._touch = r.register_script(redis_scripts.TOUCH)
        self._idle_for = r.register_script(redis_scripts.IDLE_FOR)
        self._acquire_budget = r.register_script(redis_scripts.ACQUIRE_BUDGET)
        self._renew_budget = r.register_script(redis_scripts.RENEW_BUDGET)
        self._release_budget = r.register_script(redis_scripts.RELEASE_BUDGET)
        self._budget_usage = r.register_script(redis_scripts.BUDGET_USAGE)
        self._add_counts = r.register_script(redis_scripts.ADD_COUNTS)
        self._budget_keys = [
            self._budget_key(name)
            for name in (
                "slots",
                "slot_tenant",
                "queue",
                "waiting_until",
                "queue_entry",
                "seq",
                "bucket",
                "tenants",
            )
        ]
        self._journal_key = f"{key_prefix}:{{journal}}"
        self._counts_key = f"{key_prefix}:{{gallery}}:counts"
        self._channel_head = f"{key_prefix}:{{"
        self._channel_tail = "}:changed"
        self._pattern_glob = f"{_glob_escape(key_prefix)}:{{*}}:changed"
        self._cluster = is_cluster(url)
        self._watches_changed = asyncio.Event()
        self._state_decoder = msgspec.json.Decoder(AppWakeState)
        self._transition_decoder = msgspec.json.Decoder(Transition)
        self._watches: dict[str, _Watch] = {}
        self._listener: asyncio.Task[None] | None = None
        self._pubsub_failures = 0
        self._closed = False

    # ------------------------------------------------------------------ keys

    def app_key(self, app: str, name: str) -> str:
        """`prefix:{app}:name`; the `{app}` hash tag puts all of an app's keys in one slot."""
        return f"{self._prefix}:{{{app}}}:{name}"

    def _budget_key(self, name: str) -> str:
        return f"{self._prefix}:{{budget}}:{name}"

    def app_keys(self, app: str) -> list[str]:
        """Every key and the channel used for `app` (for tests and operators)."""
        names = ("lease", "fence", "state", "seen", "changed")
        return [self.app_key(app, name) for name in names]

    def budget_keys(self) -> list[str]:
        return list(self._budget_keys)

    # ------------------------------------------------------------------ plumbing

    def _guard(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Bound one operation in time and turn any Redis failure into StoreUnavailable."""
        return guarded(what, self._op_timeout, self._closed)

    # ------------------------------------------------------------------ lease

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease | None:
        keys = [self.app_key(app, "lease"), self.app_key(app, "fence")]
        async with self._guard("acquire_lease"):
            token = int(await self._acquire_lease(keys, [owner, _ms(ttl)]))
        return Lease(owner, token) if token else None

    async def renew_lease(self, app: str, owner: str, ttl: float) -> bool:
        async with self._guard("renew_lease"):
            return bool(await self._renew_lease([self.app_key(app, "lease")], [owner, _ms(ttl)]))

    async def release_lease(self, app: str, owner: str) -> None:
        async with self._guard("release_lease"):
            await self._release_lease([self.app_key(app, "lease")], [owner])

    async def lease_owner(self, app: str) -> str | None:
        async with self._guard("lease_owner"):
            return await self._redis.get(self.app_key(app, "lease"))

    # ------------------------------------------------------------------ state

    async def read_state(self, app: str) -> AppWakeState:
        async with self._guard("read_state"):
            data, token, version = await self._redis.hmget(
                self.app_key(app, "state"), ["data", "token", "version"]
            )
        return self._decode_state(app, data, token, version)

    def _decode_state(
        self, app: str, data: str | None, token: str | None, version: str | None
    ) -> AppWakeState:
        if data is None:
            return AppWakeState(app=app)
        state = self._state_decoder.decode(data)
        # token and version live beside the JSON so the script bumps them without parsing it.
        return msgspec.structs.replace(state, token=int(token or 0), version=int(version or 0))

    async def read_states(self, apps: list[str]) -> list[AppWakeState]:
        if not apps:
            return []
        async with self._guard("read_states"), self._redis.pipeline(transaction=False) as pipe:
            for app in apps:
                pipe.hmget(self.app_key(app, "state"), ["data", "token", "version"])
            rows = await pipe.execute()
        return [self._decode_state(app, *row) for app, row in zip(apps, rows, strict=True)]

    async def write_state(self, state: AppWakeState, token: int) -> bool:
        keys = [self.app_key(state.app, "fence"), self.app_key(state.app, "state")]
        data = msgspec.json.encode(state)
        async with self._guard("write_state"):
            return bool(await self._write_state(keys, [data, token]))

    # ------------------------------------------------------------------ journal

    async def append_transition(self, transition: Transition) -> None:
        fields = {"app": transition.app, "data": msgspec.json.encode(transition)}
        async with self._guard("append_transition"):
            # Approximate trimming is O(1) amortised; reads never look past the
            # newest `journal_limit` entries, so the cap as seen by callers is exact.
            await self._redis.xadd(
                self._journal_key, fields, maxlen=self._journal_limit, approximate=True
            )

    async def transitions(self, app: str | None = None, limit: int = 100) -> list[Transition]:
        limit = min(limit, self._journal_limit)
        if limit <= 0:
            return []
        found: list[Transition] = []
        scanned = 0
        upper: str | None = "+"
        async with self._guard("transitions"):
            # Newest first, a page at a time, never past the journal's cap.
            while upper is not None and len(found) < limit and scanned < self._journal_limit:
                count = limit if app is None else _JOURNAL_PAGE
                count = min(count, self._journal_limit - scanned)
                rows = await self._redis.xrevrange(self._journal_key, upper, "-", count=count)
                if not rows:
                    break
                scanned += len(rows)
                for _, fields in rows:
                    if (app is None or fields.get("app") == app) and len(found) < limit:
                        found.append(self._transition_decoder.decode(fields["data"]))
                upper = _before(rows[-1][0])
        found.reverse()
        return found

    # ------------------------------------------------------------------ change notification

    async def publish(self, app: str) -> None:
        channel = self.app_key(app, "changed")
        async with self._guard("publish"):
            if self._cluster:
                await self._redis.spublish(channel, "1")  # to the app's slot's node only
            else:
                await self._redis.publish(channel, "1")

    async def wait_change(self, app: str, version: int, timeout: float) -> AppWakeState:
        if self._closed:
            raise StoreUnavailable("redis store closed (wait_change)")
        self._ensure_listener()
        watch = self._watches.get(app)
        if watch is None:
            watch = self._watches[app] = _Watch()
            watch.task = asyncio.create_task(self._poll(app, watch), name=f"wake-watch:{app}")
            self._watches_changed.set()
        watch.waiters += 1
        arrived = watch.results
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                if watch.state is not None and watch.state.version > version:
                    return watch.state
                if watch.error is not None and watch.results > arrived:
                    raise StoreUnavailable(str(watch.error)) from watch.error
                if self._closed:
                    raise StoreUnavailable("redis store closed (wait_change)")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                changed = watch.changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and not watch.stopped:
                watch.stopped = True
                watch.kick.set()
                if self._watches.get(app) is watch:
                    del self._watches[app]
                    self._watches_changed.set()
        # At the timeout: the poller's latest view (at most one poll interval old).
        return watch.state if watch.state is not None else await self.read_state(app)

    async def _poll(self, app: str, watch: _Watch) -> None:
        """Read the app's state now, on every notification, and every poll interval."""
        while not watch.stopped:
            watch.kick.clear()  # cleared before reading: a message during the read re-polls
            try:
                state = await self.read_state(app)
            except Exception as exc:  # anything: a silent poller would strand its waiters
                if not isinstance(exc, StoreUnavailable):
                    log.warning("wake store: polling %s failed", app, exc_info=True)
                    exc = StoreUnavailable(f"redis read_state: {exc!r}")
                watch.error = exc
                watch.results += 1
                watch.notify()
            else:
                moved = watch.state is None or watch.state.version != state.version
                watch.state, watch.error = state, None
                watch.results += 1
                if moved:
                    watch.notify()
            if watch.stopped:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await watch.kick.wait()

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="wake-store-pubsub")

    def _kick(self, apps: Iterable[str]) -> None:
        for app in apps:
            watch = self._watches.get(app)
            if watch is not None:
                watch.kick.set()

    async def _listen(self) -> None:
        """Turn change notifications into kicks; reconnects with back-off.

        One server: a single pattern subscription (`prefix:{*}:changed`) for the
        whole store. A Redis Cluster has no pattern subscription for sharded
        channels, and a classic PUBLISH there is broadcast to every node; so
        each watched app's channel is SSUBSCRIBEd on the node owning the app's
        slot (SPUBLISH goes only there), and dropped when its last waiter leaves.
        Polling covers any gap either way: while (re)subscribing, and for a
        message lost in a failover.
        """
        self._pubsub_failures = 0  # in a row; a session that subscribes resets it
        while not self._closed:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await (self._sharded(pubsub) if self._cluster else self._pattern(pubsub))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or reset: polling covers us meanwhile
                log.debug("wake store pub/sub: %s; reconnecting", exc)
                # Poll now rather than at the next interval, so waiters learn of an
                # outage (or of a change whose message was lost) at once.
                self._kick(list(self._watches))
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await pubsub.aclose()
            if self._closed:
                break
            delay = backoff.delay(self._pubsub_failures, PUBSUB_RETRY_MIN, PUBSUB_RETRY_MAX)
            await asyncio.sleep(delay)
            self._pubsub_failures += 1

    def _app_of(self, channel: str) -> str | None:
        if channel.startswith(self._channel_head) and channel.endswith(self._channel_tail):
            return channel[len(self._channel_head) : -len(self._channel_tail)]
        return None

    async def _pattern(self, pubsub: PubSub) -> None:
        """One server: one pattern subscription, read until the store closes."""
        async with asyncio.timeout(self._op_timeout):
            await pubsub.psubscribe(self._pattern_glob)
        self._pubsub_failures = 0
        # Messages sent while we were not subscribed are gone: re-read everything.
        self._kick(list(self._watches))
        while not self._closed:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message.get("type") == "pmessage":
                app = self._app_of(message["channel"])
                if app is not None:
                    self._kick((app,))

    async def _sharded(self, pubsub: ClusterPubSub) -> None:
        """Cluster: the watched apps' channels, SSUBSCRIBEd as watches come and go, and
        one reader per node blocking on that node's connection, so a message is read
        the moment it arrives whichever node it comes from."""
        subscribed: set[str] = set()
        readers: dict[str, asyncio.Task[None]] = {}
        session = _Session()  # over when this subscription ends: its readers stop on it
        try:
            while not self._closed:
                self._watches_changed.clear()  # before reading the watches: a change sets it
                wanted = set(self._watches)
                if wanted != subscribed:
                    gone, new = subscribed - wanted, wanted - subscribed
                    async with asyncio.timeout(self._op_timeout):
                        if gone:
                            await pubsub.sunsubscribe(*(self.app_key(a, "changed") for a in gone))
                            subscribed -= gone
                        if new:
                            await pubsub.ssubscribe(*(self.app_key(a, "changed") for a in new))
                            subscribed |= new
                    self._pubsub_failures = 0
                    # Messages sent before the subscription are gone: re-read those apps.
                    self._kick(new)
                # redis-py keeps a connection per node with subscriptions (a failover may
                # move channels to a new one): each gets a reader.
                for name, node_pubsub in list(pubsub.node_pubsub_mapping.items()):
                    if name not in readers and node_pubsub.connection is not None:
                        readers[name] = asyncio.create_task(
                            self._read_node(pubsub, name, session),
                            name=f"wake-store-pubsub:{name}",
                        )
                changed = asyncio.create_task(self._watches_changed.wait())
                try:
                    await asyncio.wait(
                        [changed, *readers.values()],
                        timeout=1.0,  # also re-checks for nodes added by redis-py itself
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    changed.cancel()
                for name, task in list(readers.items()):
                    if task.done():
                        del readers[name]
                        task.result()  # a reader's error reconnects everything (_listen)
        finally:
            session.over = True
            # A reader's error ends the session (raised above); here they only end.
            await stop_tasks(readers.values(), what="wake store pub/sub", errors=logging.DEBUG)

    async def _read_node(self, pubsub: ClusterPubSub, name: str, session: _Session) -> None:
        """Kick the apps whose messages arrive on node `name`, until it has no channel left
        or its session is over."""
        node = self._redis.get_node(node_name=name)
        if node is None:  # gone from the slot map; only its name is read, nothing opened
            host, _, port = name.rpartition(":")
            node = ClusterNode(host, int(port))
        while not self._closed and not session.over and name in pubsub.node_pubsub_mapping:
            message = await pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=SHARDED_READ_WAIT, target_node=node
            )
            if message is not None and message.get("type") == "smessage":
                app = self._app_of(message["channel"])
                if app is not None:
                    self._kick((app,))

    # ------------------------------------------------------------------ budget

    async def acquire_budget(
        self, holder: str, tenant: str, limits: BudgetLimits, wait_for: float
    ) -> BudgetDecision:
        args = [
            holder,
            tenant,
            limits.max_concurrent_wakes,
            repr(float(limits.max_wakes_per_second)),
            limits.tenant_max_concurrent_wakes,
            repr(limits.slot_ttl * 1000.0),
            repr(wait_for * 1000.0),
        ]
        async with self._guard("acquire_budget"):
            granted, reason, retry_after = await self._acquire_budget(self._budget_keys, args)
        return BudgetDecision(bool(granted), reason, float(retry_after))

    async def renew_budget(self, holder: str, limits: BudgetLimits) -> bool:
        args = [holder, repr(limits.slot_ttl * 1000.0)]
        async with self._guard("renew_budget"):
            return bool(await self._renew_budget(self._budget_keys, args))

    async def release_budget(self, holder: str) -> None:
        async with self._guard("release_budget"):
            await self._release_budget(self._budget_keys, [holder])

    async def budget_usage(self, limits: BudgetLimits) -> BudgetUsage:
        args = [repr(float(limits.max_wakes_per_second))]
        async with self._guard("budget_usage"):
            in_use, waiting, tokens, flat = await self._budget_usage(self._budget_keys, args)
        by_tenant = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return BudgetUsage(int(in_use), int(waiting), float(tokens), by_tenant)

    # ------------------------------------------------------------------ idle

    async def touch(self, app: str) -> None:
        async with self._guard("touch"):
            await self._touch([self.app_key(app, "seen")])

    async def idle_for(self, app: str) -> float | None:
        async with self._guard("idle_for"):
            idle_ms = await self._idle_for([self.app_key(app, "seen")])
        return None if idle_ms is None else max(0.0, float(idle_ms) / 1000.0)

    # ------------------------------------------------------------------ lifecycle

    async def add_counts(self, deltas: dict[str, int], *, writer: str = "", seq: int = 0) -> None:
        if not deltas:
            return
        if writer:
            keys = [self._counts_key, f"{self._prefix}:{{gallery}}:writer:{writer}"]
            args: list[object] = [seq, COUNT_WRITER_TTL]
            for key, n in deltas.items():
                args += [key, n]
            async with self._guard("add_counts"):
                await self._add_counts(keys, args)
            return
        async with self._guard("add_counts"), self._redis.pipeline(transaction=False) as pipe:
            for key, n in deltas.items():
                pipe.hincrby(self._counts_key, key, n)
            await pipe.execute()

    async def counts(self) -> dict[str, int]:
        async with self._guard("counts"):
            raw = await self._redis.hgetall(self._counts_key)
        return {key: int(n) for key, n in raw.items()}

    async def ping(self) -> bool:
        try:
            async with self._guard("ping"):
                return bool(await self._redis.ping())
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        """Stop the pub/sub reader and pollers, wake every waiter, close the pool."""
        if self._closed:
            return
        self._closed = True
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        if self._listener is not None:
            tasks.append(self._listener)
        for watch in self._watches.values():
            watch.stopped = True
            watch.notify()  # waiters see _closed and raise instead of sitting out their timeout
        self._watches.clear()
        # Each stops on _closed / its watch's stopped too: a lost cancellation ends by itself.
        await stop_tasks(tasks, what="wake store close", errors=logging.DEBUG)
        await close_client(self._redis)
