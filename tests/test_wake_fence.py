"""Fencing tokens that survive a failover: the rule (next_fence_token) without a loop, a
fence rolled back on one redis-server, and a replica promoted mid-wake on a real cluster.

The store-side tests run the Lua the store runs, and the Lua before the time floor
(OLD_ACQUIRE_LEASE) to show they catch a reissued token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from redis.exceptions import RedisError
from stack import redis_client

from scheduler_client.local.redis_cluster import ClusterNode, LocalRedisCluster
from wake.store import redis_scripts
from wake.store.protocol import AppWakeState, next_fence_token

WAIT = 10.0
APP = "fenced"
LEASE, FENCE, STATE = (f"edge:{{{APP}}}:{name}" for name in ("lease", "fence", "state"))
TTL_MS = 30_000

# ACQUIRE_LEASE before the time floor: seeded from ms once, then INCR only.
OLD_ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', KEYS[2], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
  end
  return redis.call('INCR', KEYS[2])
end
return 0
"""
SCRIPTS = {"current": redis_scripts.ACQUIRE_LEASE, "old": OLD_ACQUIRE_LEASE}


# --------------------------------------------------------------------------- the rule


def test_next_token_is_above_the_last_and_the_clock() -> None:
    assert next_fence_token(0, 1.5) == 1_500_000
    assert next_fence_token(1_500_000, 1.5) == 1_500_001
    assert next_fence_token(5_000_000, 1.5) == 5_000_001  # a clock behind: still above
    assert next_fence_token(0, 0.0) == 1


def test_a_store_that_lost_the_last_token_issues_above_it_seconds_later() -> None:
    kept = next_fence_token(0, 100.0)  # replicated before the master died
    lost = next_fence_token(kept, 100.002)  # issued on the master, never replicated
    assert next_fence_token(kept, 102.0) > lost  # the replica, promoted 2 s later
    # The assumption: a promoted node's clock behind by more than the failover took
    # may issue a token already handed out.
    assert next_fence_token(kept, 100.001) < lost


# --------------------------------------------------------------------------- Lua


class Scripts:
    """The lease and write scripts over one client, on the app's keys as the store names them."""

    def __init__(self, client: Any, acquire_lua: str) -> None:
        self.client = client
        self._acquire = client.register_script(acquire_lua)
        self._write = client.register_script(redis_scripts.WRITE_STATE)

    async def acquire(self, owner: str) -> int:
        return int(await self._acquire([LEASE, FENCE], [owner, TTL_MS]))

    async def write(self, state: str, token: int) -> bool:
        data = msgspec.json.encode(AppWakeState(app=APP, state=state))
        return bool(await self._write([FENCE, STATE], [data, token]))


@pytest.mark.parametrize("script", ["current", "old"])
async def test_a_rolled_back_fence_never_reissues_a_token(fresh_redis: str, script: str) -> None:
    """One server: the fence set back to its value before the last grant (as a replica
    that missed the grant holds it), the lease gone with it."""
    client = redis_client(fresh_redis, decode_responses=True)
    try:
        lua = Scripts(client, SCRIPTS[script])
        kept = await lua.acquire("z")
        await client.delete(LEASE)
        lost = await lua.acquire("stale")
        assert await lua.write("starting", lost)
        await client.set(FENCE, kept)
        await client.delete(LEASE)
        fresh = await lua.acquire("fresh")
        stale_accepted = await lua.write("failed", lost)
    finally:
        await client.aclose()
    if script == "current":
        assert fresh > lost > kept and not stale_accepted
    else:  # what the time floor fixed: the same token twice, the stale write let in
        assert fresh == lost and stale_accepted


# --------------------------------------------------------------------------- a real failover


def wait_for(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.02)


async def served(call: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
    """`call()` once the cluster serves it: retried (bounded) while the slot map settles."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except RedisError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def replica_has(node: ClusterNode, fence: int) -> bool:
    """The replica holds fence `fence` and no lease (it replicated everything so far)."""
    with node.client() as c:
        c.execute_command("READONLY")
        return c.get(FENCE) == str(fence) and not c.exists(LEASE)


@pytest.mark.parametrize("script", ["current", "old"])
async def test_promoted_replica_never_reissues_a_token(
    fresh_cluster: LocalRedisCluster, script: str
) -> None:
    """A holder takes the lease on the master while its replica is cut off; the master
    dies and the replica is promoted without that grant. A new holder's token is above
    every token issued before, and the stale holder's write is refused."""
    master, replica = fresh_cluster.owner_of(FENCE)
    client = redis_client(fresh_cluster.url, decode_responses=True, socket_timeout=1.0)
    try:
        lua = Scripts(client, SCRIPTS[script])
        kept = await lua.acquire("z")  # an earlier wake, finished and replicated
        await client.delete(LEASE)
        wait_for(lambda: replica_has(replica, kept), "replica caught up")
        # Cut the replica off: stopped, its link dropped, so it can read nothing the
        # master writes next (not even bytes already in its socket buffer).
        fresh_cluster.pause(replica)
        with master.client() as c:
            assert c.client_kill_filter(_type="replica") == 1
        stale = await lua.acquire("stale")
        assert await lua.write("starting", stale)
        fresh_cluster.kill(master)
        fresh_cluster.resume(replica)
        fresh_cluster.take_over(replica)
        with replica.client() as c:
            assert c.get(FENCE) == str(kept), "the promoted replica must lack the last grant"
        fresh = await served(lambda: lua.acquire("fresh"))
        stale_accepted = await served(lambda: lua.write("failed", stale))
        fresh_accepted = await served(lambda: lua.write("hot", fresh))
    finally:
        await client.aclose()
    assert fresh_accepted
    if script == "current":
        assert fresh > stale > kept, (kept, stale, fresh)
        assert not stale_accepted, "the stale holder's write must be refused"
    else:  # the failure the time floor fixes
        assert fresh == stale and stale_accepted
