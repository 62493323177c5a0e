"""Bounded redis-py connections shared by the wake store and the durable queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from wake.store.protocol import StoreUnavailable


def bounded_client(
    url: str,
    *,
    decode_responses: bool,
    max_connections: int = 64,
    socket_timeout: float = 2.0,
    connect_timeout: float = 2.0,
) -> aioredis.Redis:
    """A client whose pool is capped and whose every socket operation has a timeout.

    A stampede of calls queues for a connection (up to the connect timeout)
    instead of opening thousands of sockets. One retry, on connection errors
    only, replaces a pooled socket that died with a Redis restart; timeouts are
    not retried, so a hung Redis costs one timeout.
    """
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
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis {what}: {exc}") from exc
