"""scheduler_client.local.app_process against real subprocesses of bench/apps/sample_app.py.

Every process runs on a free 127.0.0.1 port and is killed at teardown; every wait
is bounded. Assertions are about behaviour (ready or not, exit codes, headers,
close codes), never about how fast something happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import ROOT, eventually

from scheduler_client.local.app_process import (
    AppProcess,
    file_digest,
    missing_secrets,
    render_command,
    verify_artifact,
)
from scheduler_client.local.config import AppSpec
from scheduler_client.local.loopback import free_port

SAMPLE_APP = ROOT / "bench" / "apps" / "sample_app.py"
READY_TIMEOUT = 20.0
STOP_GRACE = 15.0
MIB = 1024 * 1024

# Ignores SIGTERM in itself and (inherited) in a forked child, then reports both pids.
# The marker is written whole and then renamed into place: the test reads it once it
# exists, and a file still being written would read empty.
IGNORE_SIGTERM = """
import os, pathlib, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
pathlib.Path(sys.argv[1] + ".tmp").write_text(f"{child.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""

# Starts its argv in a new session and exits: the app is then nobody's child of ours,
# as after a control-plane restart.
DETACH = """
import subprocess, sys
proc = subprocess.Popen(
    sys.argv[1:], start_new_session=True,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
print(proc.pid)
"""


def sample_spec(name: str = "hello", **fields) -> AppSpec:
    """An AppSpec running bench/apps/sample_app.py, like the control plane's configs."""
    fields.setdefault(
        "command", ["{python}", str(SAMPLE_APP), "--port", "{port}", "--name", "{allocation}"]
    )
    fields.setdefault("artifact", str(SAMPLE_APP))
    return AppSpec(name=name, **fields)


def script_spec(script: str, *args: str, name: str = "script") -> AppSpec:
    return AppSpec(name=name, command=["{python}", "-c", script, *args], artifact=str(SAMPLE_APP))


def _environ() -> dict[str, str]:
    # The app reads these itself; a value leaking in from the test runner's
    # environment must not change what a test means.
    return {k: v for k, v in os.environ.items() if k not in ("START_DELAY", "ALLOCATION_ID")}


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of a pid, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2]


def _running(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


Spawn = Callable[..., AppProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Factory: spawn(spec=None, allocation_id=..., environ=None) -> a started AppProcess.

    Output goes to tmp_path/<allocation>.log; every process is SIGKILLed (and
    reaped) at teardown, with whatever it forked.
    """
    started: list[AppProcess] = []

    def start(
        spec: AppSpec | None = None,
        *,
        allocation_id: str = "hello-1",
        environ: dict[str, str] | None = None,
    ) -> AppProcess:
        proc = AppProcess.spawn(
            spec or sample_spec(),
            port=free_port(),
            allocation_id=allocation_id,
            cwd=ROOT,
            environ=_environ() if environ is None else environ,
            log_path=tmp_path / f"{allocation_id}.log",
            home=tmp_path / "homes" / (spec or sample_spec()).name,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def _log(tmp_path: Path, allocation_id: str) -> str:
    try:
        return (tmp_path / f"{allocation_id}.log").read_text(errors="replace")[-3000:]
    except OSError:
        return "<no log>"


async def _ready(proc: AppProcess, tmp_path: Path, allocation_id: str = "hello-1") -> None:
    reason = await proc.wait_ready("/healthz", READY_TIMEOUT)
    assert reason is None, f"{reason}; app log:\n{_log(tmp_path, allocation_id)}"


# ------------------------------------------------------------------ pure helpers


def test_render_command_substitutes_placeholders() -> None:
    spec = AppSpec(
        name="shop",
        command=["{python}", "app.py", "--port={port}", "{allocation}/{app}", '{"k": 1}'],
        artifact="app.py",
    )
    argv = render_command(spec, port=4321, allocation_id="shop-7", python="/usr/bin/python3")
    # Only the four known placeholders change; other braces pass through as written.
    assert argv == ["/usr/bin/python3", "app.py", "--port=4321", "shop-7/shop", '{"k": 1}']
    assert render_command(spec, port=1, allocation_id="a")[0] == sys.executable


def test_missing_secrets_lists_absent_and_empty() -> None:
    spec = sample_spec(secrets=["DB_URL", "API_KEY", "EMPTY"])
    environ = {"DB_URL": "postgres://x", "EMPTY": "", "OTHER": "1"}
    assert missing_secrets(spec, environ) == ["API_KEY", "EMPTY"]
    assert missing_secrets(spec, {"DB_URL": "a", "API_KEY": "b", "EMPTY": "c"}) == []
    assert missing_secrets(sample_spec(), {}) == []


async def test_verify_artifact_match_and_mismatch(tmp_path: Path) -> None:
    artifact = tmp_path / "app.tar"
    # More than one read chunk, so the chunked hashing is exercised.
    artifact.write_bytes(os.urandom(3 * MIB + 17))
    expected = "sha256:" + hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert await file_digest(artifact) == expected

    good = sample_spec(artifact=str(artifact), digest=expected)
    assert await verify_artifact(good) == (True, expected)

    bad = sample_spec(artifact=str(artifact), digest="sha256:" + "0" * 64)
    assert await verify_artifact(bad) == (False, expected)

    # No declared digest: always accepted (the digest at config load is trusted).
    assert await verify_artifact(sample_spec(artifact=str(artifact))) == (True, expected)

    missing = sample_spec(artifact=str(tmp_path / "nope"), digest=expected)
    assert await verify_artifact(missing) == (False, "")


# ------------------------------------------------------------- spawn and probe


async def test_spawn_ready_and_request_reaches_it(
    spawn: Spawn, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proc = spawn(allocation_id="hello-a1")
    assert proc.address == f"127.0.0.1:{proc.port}"
    await _ready(proc, tmp_path, "hello-a1")

    async with client.get(f"http://{proc.address}/") as resp:
        assert resp.status == 200
        assert await resp.text() == "hello from hello-a1\n"
        assert resp.headers["X-Allocation-Id"] == "hello-a1"
        assert resp.headers["X-App-Instance"] == f"hello-a1-{proc.pid}"
    async with client.post(f"http://{proc.address}/echo", data=b"some body") as resp:
        assert await resp.read() == b"some body"
        assert resp.headers["X-Allocation-Id"] == "hello-a1"
    async with client.get(f"http://{proc.address}/no-such-route") as resp:
        assert resp.status == 404
        assert resp.headers["X-Allocation-Id"] == "hello-a1"
    assert proc.poll() is None


async def test_allocation_id_from_environment_overrides_name(
    spawn: Spawn, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    # --name gets the app name; spawn's ALLOCATION_ID still names the allocation.
    spec = sample_spec(
        "shop", command=["{python}", str(SAMPLE_APP), "--port", "{port}", "--name", "{app}"]
    )
    proc = spawn(spec, allocation_id="shop-42")
    await _ready(proc, tmp_path, "shop-42")
    async with client.get(f"http://{proc.address}/") as resp:
        assert resp.headers["X-Allocation-Id"] == "shop-42"


async def test_spawn_environment(spawn: Spawn, tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    script = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"
    spec = AppSpec(
        name="envapp",
        command=["{python}", "-c", script, str(out)],
        artifact=str(SAMPLE_APP),
        env={"MODE": "demo", "SHARED": "from-spec"},
        secrets=["DB_PASSWORD"],
    )
    environ = {
        **_environ(),
        "DB_PASSWORD": "s3cret",
        "SHARED": "from-environ",
        "PORT": "1",
        "CONTROL_PLANE_TOKEN": "platform-token",
        "OTHER_APP_SECRET": "not-yours",
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/home/operator",
    }
    proc = spawn(spec, allocation_id="envapp-1", environ=environ)
    await eventually(lambda: proc.poll() is not None, timeout=20, what="the script to exit")
    assert proc.poll() == 0
    env = json.loads(out.read_text())
    # Only a minimal base, the app's own env and secrets, and its allocation's names:
    # nothing else of the control plane's environment (its token, other apps' secrets).
    assert set(env) == {
        "PATH",
        "LANG",
        "HOME",
        "DB_PASSWORD",
        "MODE",
        "SHARED",
        "ALLOCATION_ID",
        "PORT",
    }, sorted(env)
    assert env["PATH"] == "/usr/bin:/bin" and env["LANG"] == "C.UTF-8"
    assert env["HOME"] == str(tmp_path / "homes" / "envapp")  # its own, not the operator's
    assert Path(env["HOME"]).is_dir()
    assert env["DB_PASSWORD"] == "s3cret"
    assert env["MODE"] == "demo"
    assert env["SHARED"] == "from-spec"  # spec.env over the environment
    assert env["ALLOCATION_ID"] == "envapp-1"
    assert env["PORT"] == str(proc.port)  # the allocation's port over anything inherited


async def test_start_delay_is_respected(spawn: Spawn, tmp_path: Path) -> None:
    proc = spawn(sample_spec(env={"START_DELAY": "3"}))
    # Probed for well under the delay, counted from before the app even started.
    assert await proc.wait_ready("/healthz", 0.5) == "readiness timeout"
    assert proc.poll() is None
    await _ready(proc, tmp_path)


async def test_a_ready_file_keeps_the_app_starting_until_it_exists(
    spawn: Spawn, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    proc = spawn(sample_spec(command=[*sample_spec().command, "--ready-file", str(gate)]))
    assert await proc.wait_ready("/healthz", 1.5) == "readiness timeout"
    assert proc.poll() is None
    gate.touch()
    await _ready(proc, tmp_path)


async def test_readiness_timeout_when_delay_exceeds_it(
    spawn: Spawn, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proc = spawn(sample_spec(command=[*sample_spec().command, "--start-delay", "120"]))
    assert await proc.wait_ready("/healthz", 1.0) == "readiness timeout"
    assert proc.poll() is None  # still starting, not dead

    # The app has bound its port early and says "not ready" on every route.
    statuses: list[int] = []

    async def answered() -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with client.get(f"http://{proc.address}/healthz") as resp:
                statuses.append(resp.status)
                assert resp.headers["X-Allocation-Id"] == "hello-1"
                return True
        return False

    await eventually(answered, timeout=READY_TIMEOUT, what="the starting app to answer")
    assert statuses == [503]
    # SIGTERM while still starting is a clean stop.
    assert await proc.terminate(STOP_GRACE) == 0


async def test_wait_ready_reports_early_exit(spawn: Spawn) -> None:
    proc = spawn(script_spec("import sys; sys.exit(4)"))
    assert await proc.wait_ready("/healthz", READY_TIMEOUT) == "exited with 4"


# ------------------------------------------------------------ failures of a live app


async def test_crash_is_seen_with_its_exit_code(
    spawn: Spawn, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proc = spawn()
    await _ready(proc, tmp_path)
    async with client.get(f"http://{proc.address}/crash?code=3") as resp:
        assert resp.status == 200
    await eventually(lambda: proc.poll() is not None, timeout=20, what="the crash")
    assert proc.poll() == 3
    assert proc.rss_bytes() is None
    assert await proc.wait_ready("/healthz", 1.0) == "exited with 3"


async def test_rss_grows_after_leak(
    spawn: Spawn, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proc = spawn()
    await _ready(proc, tmp_path)
    before = proc.rss_bytes()
    assert before is not None and before > 0
    async with client.get(f"http://{proc.address}/leak?mb=64") as resp:
        assert resp.status == 200
    after = proc.rss_bytes()
    assert after is not None
    assert after - before > 32 * MIB, (before, after)


# ------------------------------------------------------------------ stopping


async def test_terminate_lets_in_flight_finish_and_exits_zero(
    spawn: Spawn, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proc = spawn()
    await _ready(proc, tmp_path)
    slow = asyncio.create_task(client.get(f"http://{proc.address}/slow?seconds=2"))

    async def in_flight() -> bool:
        async with client.get(f"http://{proc.address}/sessions") as resp:
            return (await resp.json())["in_flight"] >= 1

    await eventually(in_flight, timeout=20, what="the slow request to be in flight")
    assert await proc.terminate(STOP_GRACE) == 0
    async with await slow as resp:
        assert resp.status == 200
        assert await resp.text() == "slept 2s\n"
    assert proc.poll() == 0
    assert await proc.active_sessions() == 0  # nothing answers: 0, not an error


async def test_terminate_sigkills_after_grace(spawn: Spawn, tmp_path: Path) -> None:
    marker = tmp_path / "ignoring"
    proc = spawn(script_spec(IGNORE_SIGTERM, str(marker)), allocation_id="stubborn")
    await eventually(marker.exists, timeout=20, what="the script to ignore SIGTERM")
    child = int(marker.read_text())
    # The forked child counts towards the app's memory.
    rss = proc.rss_bytes()
    assert rss is not None and rss > _vm_rss(proc.pid)

    assert await proc.terminate(0.5) == -signal.SIGKILL
    assert proc.poll() == -signal.SIGKILL
    # The fork went down with its process group (reaped by init, or a zombie until then).
    await eventually(lambda: not _running(child), timeout=10, what="the forked child to die")


async def test_terminate_of_exited_process_returns_its_code(spawn: Spawn) -> None:
    proc = spawn(script_spec("import sys; sys.exit(5)"))
    await eventually(lambda: proc.poll() is not None, timeout=20, what="the script to exit")
    assert await proc.terminate(STOP_GRACE) == 5
    proc.kill()  # harmless once exited
    assert proc.poll() == 5


async def test_kill_reaps(spawn: Spawn, tmp_path: Path) -> None:
    proc = spawn()
    await _ready(proc, tmp_path)
    proc.kill()
    assert proc.poll() == -signal.SIGKILL
    assert _proc_state(proc.pid) is None  # reaped: no zombie left behind


# ------------------------------------------------------------------ adoption


async def test_adopt_live_process_and_then_dead(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    app = [sys.executable, str(SAMPLE_APP), "--port", str(port), "--name", "hello-adopt"]
    launched = subprocess.run(
        [sys.executable, "-c", DETACH, *app], capture_output=True, text=True, timeout=30
    )
    assert launched.returncode == 0, launched.stderr
    pid = int(launched.stdout.strip())
    try:
        proc = AppProcess.adopt(pid, port)
        assert proc is not None and proc.adopted
        assert proc.address == f"127.0.0.1:{port}"
        assert proc.poll() is None
        assert await proc.wait_ready("/healthz", READY_TIMEOUT) is None
        async with client.get(f"http://{proc.address}/") as resp:
            assert resp.headers["X-App-Instance"] == f"hello-adopt-{pid}"
        rss = proc.rss_bytes()
        assert rss is not None and rss > 0

        # Not our child: it exits 0 on SIGTERM, but only its parent sees that code.
        assert await proc.terminate(STOP_GRACE) is None
        assert proc.poll() == -1
        assert proc.rss_bytes() is None
        assert AppProcess.adopt(pid, port) is None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if _running(pid):
                os.killpg(pid, signal.SIGKILL)


async def test_adopt_refuses_zombie_and_non_leader(spawn: Spawn, tmp_path: Path) -> None:
    proc = spawn(script_spec("import time; time.sleep(120)"))
    assert AppProcess.adopt(proc.pid, proc.port) is not None
    # Killed but not yet reaped (no poll()): a zombie is not adoptable.
    os.kill(proc.pid, signal.SIGKILL)
    await eventually(lambda: _proc_state(proc.pid) == "Z", timeout=10, what="a zombie")
    assert AppProcess.adopt(proc.pid, proc.port) is None
    assert proc.poll() == -signal.SIGKILL  # and now it is reaped

    # A live pid that does not lead its own session was not started by spawn().
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert AppProcess.adopt(other.pid, 1) is None
    finally:
        other.kill()
        other.wait(10)


async def test_adopt_checks_recorded_start_time(spawn: Spawn) -> None:
    proc = spawn(script_spec("import time; time.sleep(120)"))
    assert proc.start_ticks is not None
    assert AppProcess.adopt(proc.pid, proc.port, start_ticks=proc.start_ticks) is not None
    # Same pid, different start time: the pid was reused by another process.
    assert AppProcess.adopt(proc.pid, proc.port, start_ticks=proc.start_ticks + 1) is None


# ---------------------------------------------------------------- websockets


async def test_websocket_counted_and_closed_1001_on_terminate(
    spawn: Spawn, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proc = spawn()
    await _ready(proc, tmp_path)
    assert await proc.active_sessions() == 0
    async with client.ws_connect(f"http://{proc.address}/ws") as ws:
        await ws.send_str("hi")
        echoed = await ws.receive(timeout=10)
        assert echoed.type is aiohttp.WSMsgType.TEXT and echoed.data == "hi"
        assert await proc.active_sessions() == 1

        stopping = asyncio.create_task(proc.terminate(STOP_GRACE))
        message = await ws.receive(timeout=STOP_GRACE)
        assert message.type is aiohttp.WSMsgType.CLOSE, message
        assert message.data == aiohttp.WSCloseCode.GOING_AWAY
        assert ws.close_code == 1001
        assert await stopping == 0
