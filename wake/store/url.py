"""Open the wake store named by `edge.store`: memory://, redis:// (rediss://, unix://) or
a Redis Cluster (redis+cluster://host:port,host:port..., rediss+cluster:// for TLS)."""

from __future__ import annotations

from wake.store.memory import JOURNAL_LIMIT, MemoryStore
from wake.store.protocol import WakeStore

# The schemes the Redis store takes (kept here so config checks need not import redis-py).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def open_store(
    url: str, *, journal_limit: int = JOURNAL_LIMIT, key_prefix: str = "edge"
) -> WakeStore:
    """A store for `url`; connects lazily, so opening never blocks on the network.

    Redis connection options (e.g. `?socket_timeout=5`) may be given in the URL's
    query string and override the store's defaults.
    """
    if url.startswith("memory://"):
        return MemoryStore(journal_limit=journal_limit)
    if url.startswith(REDIS_SCHEMES):
        from wake.store.redis_backend import RedisStore  # redis-py only when it is used

        return RedisStore(url, journal_limit=journal_limit, key_prefix=key_prefix)
    raise ValueError(
        f"unknown store {url!r}: expected memory://, redis://, rediss://, unix://, "
        "redis+cluster:// or rediss+cluster://"
    )
