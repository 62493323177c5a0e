"""Every Redis call the product makes stays in one Cluster hash slot, checked on real servers.

The wake store and the durable queue run through their real code paths against a
redis-server of the test's own while a MONITOR connection records every command,
including those a Lua script runs (Redis shows them as `[0 lua]` right after the
script's EVALSHA). For each command, the real server names its keys
(`COMMAND GETKEYS`) and the running Redis Cluster names their slots (`CLUSTER KEYSLOT`):

- a script's declared KEYS all share one slot;
- every key a script touches was declared in its KEYS (a key built in Lua from ARGV or
  a prefix would work on one Redis but break on a Cluster node that does not own it);
- any other command with several keys keeps them in one slot;
- every key carries a hash tag (`prefix:{app}:name`, `prefix:{budget}:name`, ...), so
  the keys that belong together stay together as scripts grow.

So a new key without the right hash tag fails here. A new script fails too until the
scenario below runs it (every registered script must show up), and a new module that
runs Lua fails until it is added to the scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.commands.core import AsyncScript
from stack import RedisProcess

from edge.queue.durable_queue import DurableQueue, NotReplicated
from edge.queue.replica_ack import ReplicaAck
from scheduler_client.local.redis_cluster import LocalRedisCluster
from wake.budget import BudgetLimits
from wake.store.protocol import AppWakeState, Transition
from wake.store.redis_backend import RedisStore

ROOT = Path(__file__).resolve().parent.parent
# Product modules that run Lua, each exercised by `scenario` below.
LUA_MODULES = {"wake/store/redis_backend.py", "edge/queue/durable_queue.py"}
LIMITS = BudgetLimits(
    max_concurrent_wakes=1, max_wakes_per_second=100.0, tenant_max_concurrent_wakes=5, slot_ttl=10
)
MARKER = "keyslot-scenario-done"
WAIT = 10.0


@dataclass
class Command:
    """One command as MONITOR showed it: who ran it (a client address or `lua`) and argv."""

    source: str
    argv: list[str]
    inner: list[Command] = field(default_factory=list)  # a script's own commands


_LINE = re.compile(r"^\+[\d.]+ \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b"}


def _unescape(text: str) -> str:
    """Undo MONITOR's quoting (sdscatrepr)."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code.startswith("x") and len(code) == 3:
            return chr(int(code[1:], 16))
        return _SIMPLE.get(code, code)

    return _ESCAPE.sub(one, text)


def has_tag(key: str) -> bool:
    """Whether Redis hashes `key` by a tag: a `{` followed, later, by a non-empty `...}`."""
    start = key.find("{")
    return start >= 0 and key.find("}", start + 1) > start + 1


def parse_monitor(lines: list[str]) -> list[Command]:
    """Commands in order, each script's inner commands attached to its EVALSHA/EVAL."""
    commands: list[Command] = []
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        command = Command(m.group(1), [_unescape(a) for a in _ARG.findall(m.group(2))])
        if command.source == "lua":
            assert commands and is_script(commands[-1]), f"lua command outside a script: {line}"
            commands[-1].inner.append(command)
        else:
            commands.append(command)
    return commands


def script_sha(command: Command) -> str:
    """The sha of the script a command runs: EVALSHA names it, EVAL sends the text."""
    if command.argv[0].upper() in ("EVAL", "EVAL_RO"):
        return hashlib.sha1(command.argv[1].encode("latin-1")).hexdigest()
    return command.argv[1]


def is_script(command: Command) -> bool:
    return command.argv[0].upper() in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO")


async def monitor(port: int, lines: list[str], ready: asyncio.Event) -> None:
    """Append every MONITOR line of the server on `port` until cancelled."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"MONITOR\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"+OK")
        ready.set()
        while True:
            line = await reader.readline()
            if not line:
                return
            lines.append(line.decode("latin-1").rstrip("\r\n"))
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def monitored(port: int) -> AsyncIterator[list[str]]:
    """MONITOR lines of everything run inside the block (complete once it exits)."""
    lines: list[str] = []
    ready = asyncio.Event()
    task = asyncio.create_task(monitor(port, lines, ready))
    try:
        async with asyncio.timeout(WAIT):
            await ready.wait()
        yield lines
        # The marker, sent last on its own connection, shows everything before it was seen.
        with redis.Redis(port=port) as marker:
            marker.echo(MARKER)
        async with asyncio.timeout(WAIT):
            while not any(MARKER in line for line in lines):
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def registered_scripts(*objects: object) -> dict[str, str]:
    """sha -> `Class._attribute` of every script the objects registered with redis-py."""
    return {
        value.sha: f"{type(obj).__name__}.{name}"
        for obj in objects
        for name, value in vars(obj).items()
        if isinstance(value, AsyncScript)
    }


async def scenario(store: RedisStore, queue: DurableQueue) -> None:
    """Every store and queue operation, reaching every script (and each script's
    key-building branches: a dedupe key with braces, a finish that begins the next)."""
    lease = await store.acquire_lease("shop", "edge-a", 5)
    assert lease is not None
    assert await store.renew_lease("shop", "edge-a", 5)
    await store.write_state(AppWakeState(app="shop", state="waking"), lease.token)
    await store.release_lease("shop", "edge-a")
    await store.touch("shop")
    await store.idle_for("shop")
    for holder in ("h1", "h2", "h3"):
        await store.acquire_budget(holder, "acme", LIMITS, 30)  # h2, h3 wait in the queue
    await store.renew_budget("h1", LIMITS)
    await store.budget_usage(LIMITS)
    await store.release_budget("h1")
    await store.release_budget("h3")
    await store.add_counts({"page": 1}, writer="edge-a/1", seq=1)
    await store.add_counts({"page": 1})
    await store.append_transition(Transition(app="shop", from_state="cold", to_state="waking"))
    await store.transitions("shop")
    await store.read_states(["shop", "blog"])
    await store.publish("shop")

    replayer = await queue.acquire_replayer("shop", "edge-a", 30)
    assert replayer is not None
    assert await queue.renew_replayer("shop", replayer, 30)
    for key in ("h:idempotency-key:{evil}", "k1", "k2", "k3", "k4"):
        await queue.enqueue(
            "shop",
            method=b"POST",
            path=b"/hooks",
            head=b"POST /hooks HTTP/1.1\r\n\r\n",
            body=b"{}",
            key=key,
            arrived=1.0,
            retention=60,
            max_queued=100,
        )
    # With min_replicas_acked: the script and WAIT on one connection; a duplicate's
    # record rewritten (no replica here: refused, which changes no key).
    with contextlib.suppress(NotReplicated):
        await queue.enqueue(
            "shop",
            method=b"POST",
            path=b"/hooks",
            head=b"",
            body=b"",
            key="k1",
            arrived=1.0,
            retention=60,
            max_queued=100,
            ack=ReplicaAck(1, 0.05),
        )
    batch = await queue.next_batch("shop", "edge-a", 60, 3, replayer)
    assert batch is not None and len(batch) == 3
    assert await queue.begin("shop", batch[0], replayer) == 1
    assert await queue.finish("shop", batch[0], replayer, then=batch[1]) == 1
    await queue.dead_letter("shop", batch[1], replayer, "status 400", 400, 1, 10)
    await queue.dead_letter("shop", batch[2], replayer, "status 400", 400, 1, 1)  # drops one
    [dead] = await queue.list("shop", "dead", 10)
    assert await queue.requeue_dead("shop", dead.id, 60)
    await asyncio.sleep(0.01)  # so every entry is older than "now" by server time
    moved, _ = await queue.expire("shop", 0, 1, replayer)
    assert moved > 0
    await queue.depth("shop")
    await queue.purge("shop", "dead")
    await queue.release_replayer("shop", replayer)


@pytest.fixture
def slots(redis_cluster: LocalRedisCluster):
    """key -> its slot, as the running cluster's CLUSTER KEYSLOT says."""
    seen: dict[str, int] = {}
    node = redis_cluster.nodes[0].client()

    def slot(key: str) -> int:
        if key not in seen:
            seen[key] = int(node.execute_command("CLUSTER", "KEYSLOT", key))
        return seen[key]

    yield slot
    node.close()


def keys_of(admin: redis.Redis, argv: list[str]) -> list[str]:
    """The keys in a command, as the real server parses it (none for keyless commands)."""
    try:
        return list(admin.command_getkeys(*argv))
    except redis.ResponseError:  # "The command has no key arguments"
        return []


async def test_every_call_stays_in_one_slot(own_redis: RedisProcess, slots) -> None:
    store, queue = RedisStore(own_redis.url), DurableQueue(own_redis.url)
    scripts = registered_scripts(store, queue)
    try:
        async with monitored(own_redis.port) as lines:
            await scenario(store, queue)
    finally:
        await store.close()
        await queue.close()

    commands = parse_monitor(lines)
    problems: dict[str, None] = {}  # ordered, each problem once
    ran: set[str] = set()
    with redis.Redis(port=own_redis.port, decode_responses=True) as admin:
        for command in commands:
            if is_script(command):
                sha = script_sha(command)
                name = scripts.get(sha, sha)
                ran.add(sha)
                declared = command.argv[3 : 3 + int(command.argv[2])]
                if len({slots(k) for k in declared}) > 1:
                    problems[f"{name}: KEYS in several slots: {declared}"] = None
                for inner in command.inner:
                    for key in keys_of(admin, inner.argv):
                        if key not in declared:
                            problems[f"{name}: {inner.argv[0]} touches {key!r}, not in KEYS"] = None
            else:
                declared = keys_of(admin, command.argv)
                if len({slots(k) for k in declared}) > 1:
                    problems[f"{command.argv[0]} over several slots: {declared}"] = None
            for key in declared:
                if not has_tag(key):
                    problems[f"{command.argv[0]}: key {key!r} has no hash tag"] = None
    assert not problems, "\n".join(problems)
    missing = sorted(scripts[sha] for sha in scripts.keys() - ran)
    assert not missing, f"scripts the scenario never ran (add them to it): {missing}"
    assert ran <= scripts.keys(), "a script ran that no store or queue registered"


def test_the_lua_running_modules_are_the_ones_checked() -> None:
    """A new module with register_script/eval must join LUA_MODULES and the scenario."""
    found = set()
    for package in ("edge", "wake", "scheduler_client"):
        for path in (ROOT / package).rglob("*.py"):
            if re.search(r"register_script\(|\.eval(sha)?(_ro)?\(|\bfcall\(", path.read_text()):
                found.add(str(path.relative_to(ROOT)))
    assert found == LUA_MODULES


def test_monitor_lines_are_parsed_with_their_quoting() -> None:
    lines = [
        '+1.0 [0 127.0.0.1:1] "EVALSHA" "abc" "1" "k{a}" "v w\\"q" "\\x00\\xff"',
        '+1.1 [0 lua] "SET" "k{a}" "v w\\"q"',
        '+1.2 [0 127.0.0.1:1] "GET" "x"',
    ]
    first, second = parse_monitor(lines)
    assert first.argv == ["EVALSHA", "abc", "1", "k{a}", 'v w"q', "\x00\xff"]
    assert [c.argv for c in first.inner] == [["SET", "k{a}", 'v w"q']]
    assert second.argv == ["GET", "x"] and not second.inner


def test_hash_tags_as_redis_reads_them() -> None:
    assert has_tag("edge:{shop}:key:{x}") and has_tag("a{b}")
    assert not has_tag("edge:shop") and not has_tag("a{}{b}") and not has_tag("a}{")
