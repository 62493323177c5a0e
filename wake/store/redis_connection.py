"""Bounded redis-py connections shared by the wake store and the durable queue.

One server (`redis://`, `rediss://`, `unix://`) or a Redis Cluster
(`redis+cluster://host:port[,host:port...]`, `rediss+cluster://` for TLS): the
seed nodes are where the client first asks for the slot map; any one that
answers is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wake.store.protocol import StoreUnavailable

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SLOTS = 16384

RedisClient = aioredis.Redis | RedisCluster


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def cluster_seeds(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seed nodes of a `redis+cluster://` URL, and the connection options it gives
    (credentials, TLS, query string) as redis-py parses them for one server.

    Raises ValueError for a URL without seeds, with a port missing, or with a db.
    """
    scheme, _, rest = url.partition("://")
    parts = urlsplit(f"//{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for seed in hosts.split(","):
        host, _, port = seed.strip().rpartition(":")
        host = host.strip("[]")  # [::1]:7000
        if not host or not port.isdigit():
            raise ValueError(f"cluster seed {seed!r}: expected host:port")
        seeds.append((host, int(port)))
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only db 0, not {parts.path!r}")
    single = "rediss" if scheme == "rediss+cluster" else "redis"
    at = f"{userinfo}@" if userinfo else ""
    query = f"?{parts.query}" if parts.query else ""
    options: dict[str, Any] = dict(parse_url(f"{single}://{at}{seeds[0][0]}:{seeds[0][1]}{query}"))
    for name in ("host", "port", "db"):
        options.pop(name, None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return seeds, options


# Connections a node may have beyond the gated commands': pub/sub (one per node),
# the slot map refresh, and pipelines (which bypass the gate).
NODE_HEADROOM = 4
# Tries of a batch that must reach the master of a slot (a failover in between).
ONE_CONNECTION_ATTEMPTS = 3


class BoundedCluster(RedisCluster):
    """RedisCluster whose commands queue for one of `max_connections` slots.

    redis-py's cluster client raises MaxConnectionsError at once when a node's
    connections are all busy; a stampede must instead wait its turn (up to
    `wait_timeout`), as it does for the single-server BlockingConnectionPool.
    """

    def __init__(self, *, max_connections: int, wait_timeout: float, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections + NODE_HEADROOM, **kwargs)
        self._gate = asyncio.Semaphore(max_connections)
        self._wait_timeout = wait_timeout

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._wait_timeout):
                await self._gate.acquire()
        except TimeoutError as exc:
            raise RedisConnectionError("no free Redis Cluster connection in time") from exc
        try:
            yield
        finally:
            self._gate.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            # Read the slot map before any command goes out: redis-py 8.1, reading it
            # under a stampede of first commands, disconnects seed connections others
            # are still using (AttributeError on a None writer, not retried).
            await self.initialize()
        async with self._turn():
            return await super().execute_command(*args, **kwargs)

    async def _forget(self, node: ClusterNode) -> None:
        """As redis-py does after a failed command: drop the node's sockets and re-read the
        slot map before the next try (the master may have failed over)."""
        node.update_active_connections_for_reconnect()
        await node.disconnect_free_connections()
        self.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
        self._initialize = True

    async def on_master(
        self, key: str, commands: list[tuple[Any, ...]], deadline: float | None = None
    ) -> list[Any]:
        """Send `commands` back to back on one connection to the master of `key`'s slot;
        each one's result or error, in order. Raises when no attempt reached the master
        (no new attempt starts past `deadline`, loop time: the caller's guard can lose its
        cancel inside redis-py on Python 3.11, so the retries check the time themselves)."""
        failure: Exception = RedisConnectionError(f"no master for {key!r}")
        loop = asyncio.get_running_loop()
        for attempt in range(ONE_CONNECTION_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.05 * 2**attempt)
            if deadline is not None and loop.time() >= deadline:
                break
            await self.initialize()  # re-reads the slot map when a failure asked for it
            node = self.get_node_from_key(key)
            batch = [PipelineCommand(i, *args) for i, args in enumerate(commands)]
            try:
                async with self._turn():
                    await node.execute_pipeline(batch)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                await self._forget(node)
                failure = exc
                continue
            first = batch[0].result
            if isinstance(first, RedisConnectionError | RedisTimeoutError):
                # The connection broke under the batch (the master died). The script may
                # have run; a resend finds its dedupe record.
                await self._forget(node)
                failure = first
                continue
            # Redirected (MOVED is an AskError) or the cluster between masters: the
            # later commands ran on the wrong node or not at all, so the batch is void.
            if isinstance(first, AskError | ClusterDownError | TryAgainError):
                self._initialize = True
                failure = first
                continue
            return [command.result for command in batch]
        raise failure


def bounded_client(
    url: str,
    *,
    decode_responses: bool,
    max_connections: int = 64,
    socket_timeout: float = 2.0,
    connect_timeout: float = 2.0,
) -> RedisClient:
    """A client whose pool is capped and whose every socket operation has a timeout.

    A stampede of calls queues for a connection (up to the connect timeout)
    instead of opening thousands of sockets. One server: one retry, on
    connection errors only, replaces a pooled socket that died with a Redis
    restart; timeouts are not retried, so a hung Redis costs one timeout. A
    cluster: a few quick retries, each after re-reading the slot map, so a
    moved slot or a promoted replica is found (callers bound the whole call).
    """
    if is_cluster(url):
        seeds, options = cluster_seeds(url)
        settings: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            "decode_responses": decode_responses,
        }
        settings.update(options)  # the URL's options win, as for one server
        return BoundedCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            max_connections=max_connections,
            wait_timeout=connect_timeout,
            **settings,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=connect_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        decode_responses=decode_responses,
    )
    return aioredis.Redis(connection_pool=pool)


async def on_one_connection(
    client: RedisClient, key: str, commands: list[tuple[Any, ...]], deadline: float | None = None
) -> list[Any]:
    """Send `commands` back to back on one connection (on a cluster: to the master of
    `key`'s slot), as WAIT needs: it counts the replicas that have the writes of its own
    connection. Each command's result or error, in order."""
    if isinstance(client, BoundedCluster):
        return await client.on_master(key, commands, deadline)
    if isinstance(client, RedisCluster):
        raise TypeError("on_one_connection needs the bounded cluster client")
    pipe = client.pipeline(transaction=False)  # one pooled connection for the batch
    for args in commands:
        pipe.execute_command(*args)
    return await pipe.execute(raise_on_error=False)


async def close_client(client: RedisClient) -> None:
    """Close the client and every pooled connection, ignoring errors (we are leaving)."""
    with contextlib.suppress(Exception):
        await client.aclose()
    if isinstance(client, aioredis.Redis):
        with contextlib.suppress(Exception):
            await client.connection_pool.aclose()


async def info_everywhere(client: RedisClient, section: str) -> list[dict[str, Any]]:
    """INFO `section` of the server, or of every node of a cluster."""
    if isinstance(client, RedisCluster):
        found = await client.info(section, target_nodes=RedisCluster.ALL_NODES)
        return list(found.values())
    return [await client.info(section)]


class ClusterState(msgspec.Struct, frozen=True, kw_only=True):
    """A Redis Cluster as its slot map shows it (what `edge check` reports)."""

    state: str  # cluster_state of the node asked: ok or fail
    slots_covered: int
    masters: int
    replicas: int
    masters_without_replica: int


def summarize_cluster_nodes(state: str, nodes: dict[str, dict[str, Any]]) -> ClusterState:
    """ClusterState from redis-py's parsed CLUSTER NODES; failed or disconnected nodes
    count for nothing (a replica that is down protects no data)."""
    live = {
        node["node_id"]: node
        for node in nodes.values()
        if node["connected"] and not {"fail", "noaddr"} & set(node["flags"].split(","))
    }
    masters = {i: n for i, n in live.items() if "master" in n["flags"].split(",")}
    replicas = [n for n in live.values() if "slave" in n["flags"].split(",")]
    with_replica = {n["master_id"] for n in replicas} & masters.keys()
    return ClusterState(
        state=state,
        slots_covered=sum(
            int(high) - int(low) + 1 for n in masters.values() for low, high in n["slots"]
        ),
        masters=len(masters),
        replicas=len(replicas),
        masters_without_replica=len(masters) - len(with_replica),
    )


async def cluster_state(url: str, timeout: float = 5.0) -> ClusterState:
    """Ask the seeds of a redis+cluster:// URL in order for the cluster's state (the first
    that answers, its view); raises StoreUnavailable when none answers in time."""
    seeds, options = cluster_seeds(url)
    options.setdefault("socket_timeout", 2.0)
    options.setdefault("socket_connect_timeout", 2.0)
    # One try per seed: a dead one costs its refused connect, a hung one its socket
    # timeout, and the next seed is asked (a random node of the slot map could be the
    # dead one, until the others flag it failed).
    options["retry"] = Retry(NoBackoff(), 0)
    failures: list[str] = []
    async with guarded("cluster state", timeout):
        for host, port in seeds:
            node = aioredis.Redis(host=host, port=port, decode_responses=True, **options)
            try:
                info = await node.cluster("INFO")
                nodes = await node.cluster("NODES")  # the same node's view as its INFO
            except (RedisError, OSError) as exc:
                failures.append(f"{host}:{port}: {exc or type(exc).__name__}")
                continue
            finally:
                await close_client(node)
            return summarize_cluster_nodes(str(info.get("cluster_state", "unknown")), nodes)
    raise StoreUnavailable("redis cluster state: no seed answered: " + "; ".join(failures))


@contextlib.asynccontextmanager
async def guarded(what: str, op_timeout: float, closed: bool = False) -> AsyncIterator[None]:
    """Bound one operation in time and turn any Redis failure into StoreUnavailable."""
    if closed:
        raise StoreUnavailable(f"redis closed ({what})")
    try:
        async with asyncio.timeout(op_timeout):
            yield
    except StoreUnavailable:
        raise
    except TimeoutError as exc:  # our overall deadline, or redis-py's socket timeout
        raise StoreUnavailable(f"redis {what}: timed out ({exc})") from exc
    except (RedisError, RedisClusterException, OSError) as exc:
        # RedisClusterException is no RedisError: the cluster client raises it when no
        # node gives a slot map (every seed down) or a slot has no owner. Some errors
        # (MaxConnectionsError) say nothing: name them at least.
        raise StoreUnavailable(f"redis {what}: {exc or type(exc).__name__}") from exc
