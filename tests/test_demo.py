"""`make run`'s demo (scripts/run-local) as a newcomer runs it: the real script on free
ports, then every line of its printed try list, in order, as printed (`bash -c`); a
leading `sleep N;` (a person's pause) is replaced by waiting for what it waits for.

With Redis: a held wake with Server-Timing, the hot path, a webhook queued while shop
sleeps and delivered once (its duplicate not), the static app, `edge status`, both apps
asleep again after a short idle (HELLO_IDLE/SHOP_IDLE), a checkout refused with
Retry-After, and hello woken again. With DEMO_STORE=memory: queueing is off, said so,
and the rest still works. The demo is stopped as a terminal's Ctrl-C would (a signal to
its process group); no process of it may be left, app processes included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, free_port

RUN_LOCAL = ROOT / "scripts" / "run-local"
TOKEN = "demo-test-token"
START_TIMEOUT = 60.0
LINE_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0
# Short, so the try list's "sleep again" step takes seconds, not half a minute; but longer
# than the try list's 4-5 s waits for a wake, which count as idle time (from the request
# that started the wake), or shop would sleep again before they look.
IDLE = "6s"


@dataclass
class TryLine:
    command: str
    expected: str


@dataclass
class Ran:
    command: str
    code: int
    out: str

    def status_codes(self) -> list[int]:
        return [int(code) for code in re.findall(r"^HTTP/1\.1 (\d{3})", self.out, re.M)]

    def header(self, name: str) -> str | None:
        match = re.search(rf"^{name}: *(.*?)\r?$", self.out, re.M | re.I)
        return match.group(1) if match else None

    def took(self) -> float:
        match = re.search(r"^took ([0-9.]+)s$", self.out, re.M)
        assert match, self
        return float(match.group(1))

    def json_bodies(self) -> list[dict[str, Any]]:
        """Every JSON object in the output (one per response body)."""
        decoder = json.JSONDecoder()
        found, at = [], 0
        while (start := self.out.find("{", at)) >= 0:
            try:
                value, at = decoder.raw_decode(self.out, start)
            except ValueError:
                at = start + 1
                continue
            found.append(value)
        return found

    def __str__(self) -> str:
        return f"$ {self.command}\n(exit {self.code})\n{self.out}"


@dataclass
class Demo:
    proc: subprocess.Popen[bytes]
    log_path: Path
    run_dir: Path
    edge_port: int
    admin_port: int
    control_port: int
    static_port: int

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while "Ctrl-C stops" not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"run-local exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no try list within {START_TIMEOUT}s:\n{self.output()}")
            time.sleep(0.1)

    def try_lines(self) -> list[TryLine]:
        """The commands under "try", each with its "# expected:" comment."""
        lines = self.output().splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("try"))
        found: list[TryLine] = []
        for line in lines[start + 1 :]:
            text = line.strip()
            if not text:
                break
            if text.startswith("# expected:"):
                assert found, f"an expectation before any command: {line!r}"
                found[-1].expected = text.removeprefix("# expected:").strip()
            else:
                assert line.startswith("    "), f"not indented under try: {line!r}"
                found.append(TryLine(text, ""))
        assert found and all(line.expected for line in found), found
        return found

    def run(self, line: TryLine) -> Ran:
        command = line.command
        pause = re.match(r"sleep \d+; ", command)
        if pause:
            # A person's pause for a wake or an idle timeout: waited out by what it waits
            # for (bounded), since a loaded machine can take longer than the pause.
            self.wait_for(premise(self, line), line)
            command = command[pause.end() :]
        done = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            timeout=LINE_TIMEOUT,
            cwd=ROOT,
            check=False,
        )
        ran = Ran(line.command, done.returncode, done.stdout + done.stderr)
        assert ran.code == 0, ran
        return ran

    def _get(self, url: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())

    def wait_for(self, ready: Callable[[], bool], line: TryLine) -> None:
        deadline = time.monotonic() + LINE_TIMEOUT
        while not ready():
            assert time.monotonic() < deadline, f"never came: what {line} waits for"
            time.sleep(0.2)

    def deliveries(self) -> int:
        record = self.run_dir / "shop-webhooks.jsonl"
        return len(record.read_text().splitlines()) if record.exists() else 0

    def app_states(self) -> dict[str, str]:
        answer = self._get(f"http://127.0.0.1:{self.admin_port}/admin/apps")
        return {row["name"]: row["state"] for row in answer["apps"]}

    def live_app_pids(self) -> list[int]:
        answer = self._get(
            f"http://127.0.0.1:{self.control_port}/v1/allocations",
            {"Authorization": f"Bearer {TOKEN}"},
        )
        return [a["pid"] for a in answer["allocations"] if a["state"] not in ("stopped", "failed")]

    def stop(self) -> int | None:
        """SIGTERM to the process group (what Ctrl-C at a terminal amounts to), then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                return None
        return self.proc.returncode


def _processes_of(run_dir: Path) -> list[tuple[int, str]]:
    """Live processes that belong to this demo: its run folder is in their command line
    (edge, control plane, redis, static app) or is their working directory (apps)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (str(run_dir) in cmdline or Path(cwd).is_relative_to(run_dir)):
            found.append((int(entry.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Any]:
    """Starts run-local on free ports with its RUN_DIR under tmp_path; stops it at the end
    and kills whatever of it is left (after the test has checked that nothing is)."""
    started: list[Demo] = []

    def start(**env: str) -> Demo:
        if shutil.which("redis-server") is None and env.get("DEMO_STORE") != "memory":
            pytest.fail("redis-server is not installed; `make test` installs it", pytrace=False)
        run_dir = tmp_path / "run"
        ports = {name: free_port() for name in ("EDGE", "ADMIN", "CONTROL", "STATIC", "REDIS")}
        full_env = {k: v for k, v in os.environ.items() if k != "EDGE_ADMIN_TOKEN"}
        full_env.update(
            {f"{name}_PORT": str(port) for name, port in ports.items()},
            RUN_DIR=str(run_dir),
            VENV=str(Path(sys.executable).parent.parent),
            CONTROL_PLANE_TOKEN=TOKEN,
            HELLO_IDLE=IDLE,
            SHOP_IDLE=IDLE,
            **env,
        )
        log_path = tmp_path / "run-local.out"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["bash", str(RUN_LOCAL)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=full_env,
                start_new_session=True,  # a process group of its own, as in a terminal
            )
        demo = Demo(
            proc,
            log_path,
            run_dir,
            ports["EDGE"],
            ports["ADMIN"],
            ports["CONTROL"],
            ports["STATIC"],
        )
        started.append(demo)
        demo.wait_ready()
        return demo

    yield start
    for demo in started:
        demo.stop()
        # Shown by pytest when the test failed: the edge's log is in there.
        sys.stdout.write(f"--- run-local output ---\n{demo.output()[-20000:]}\n")
        for pid, _ in _processes_of(demo.run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def premise(demo: Demo, line: TryLine) -> Callable[[], bool]:
    """What a `sleep N; ...` line of the try list waits for, told by its expectation."""
    expected = line.expected
    if "asleep again" in expected:
        return lambda: {demo.app_states()[app] for app in ("hello", "shop")} == {"cold"}
    if "exactly once" in expected:
        return lambda: demo.deliveries() >= 1
    if "awake" in expected:
        return lambda: demo.app_states()["shop"] == "hot"
    raise AssertionError(f"a pause the test does not know what it waits for: {line}")


def stop_and_check_nothing_left(demo: Demo) -> None:
    """Stopped as Ctrl-C would: exit 0, and no process of it (nor app process) is left."""
    app_pids = demo.live_app_pids()
    status = demo.stop()
    out = demo.output()
    assert status == 0, f"run-local did not stop cleanly ({status}):\n{out[-3000:]}"
    assert "run-local: stopped" in out
    assert _processes_of(demo.run_dir) == []
    assert [pid for pid in app_pids if _alive(pid)] == []
    with sqlite3.connect(demo.run_dir / "controlplane.sqlite") as db:
        states = {state for (state,) in db.execute("SELECT state FROM allocations")}
    assert states <= {"stopped", "failed"}, states


def check_woken(ran: Ran) -> None:
    """A held request: answered once the app was up, with the wake's Server-Timing."""
    assert ran.status_codes() == [200], ran
    assert "hello from " in ran.out
    timing = ran.header("Server-Timing")
    assert timing is not None and "wake" in timing, ran
    assert ran.took() >= 0.9, ran  # the app's 1 s start delay, at least


def check_common_tail(demo: Demo, lines: list[TryLine], ran: list[Ran]) -> None:
    """From the static app on: the same in both modes."""
    static, status, asleep, checkout, retry, hello_again = ran
    assert static.status_codes() == [200] and "hello from static" in static.out, static
    assert static.header("Server-Timing") is None, static

    assert "apps by state" in status.out and "503s since start" in status.out, status
    for app in ("hello", "shop", "static"):
        assert re.search(rf"^{app}\s", status.out, re.M), status

    # The sleep-again step: both apps went cold after their (short) idle timeout.
    assert re.search(r"^hello\s+cold\s", asleep.out, re.M), asleep
    assert re.search(r"^shop\s+cold\s", asleep.out, re.M), asleep
    assert re.search(r"^static\s+hot\s", asleep.out, re.M), asleep

    assert checkout.status_codes() == [503], checkout
    assert int(checkout.header("Retry-After") or 0) >= 1, checkout
    assert retry.status_codes() == [200] and "order placed by " in retry.out, retry

    check_woken(hello_again)
    assert "asleep again" in lines[-4].expected and "wakes again" in lines[-1].expected


def test_demo_try_list_works_as_printed(start_demo) -> None:
    demo = start_demo()
    out = demo.output()
    assert out.startswith("run-local: starting"), out[:300]
    assert "redis://127.0.0.1:" in out and "(AOF on)" in out and "2 workers" in out, out
    assert f"http://127.0.0.1:{demo.admin_port}/gallery" in out
    assert (demo.run_dir / "redis" / "appendonlydir").is_dir()
    lines = demo.try_lines()
    assert len(lines) == 10, lines
    states = demo.app_states()
    assert (states["hello"], states["shop"], states["static"]) == ("cold", "cold", "hot")

    ran: list[Ran] = []
    for i, line in enumerate(lines):
        ran.append(demo.run(line))
        if i == 6:
            # After the sleep step: the edge says so too, not only `edge status`.
            states = demo.app_states()
            assert states["hello"] == "cold" and states["shop"] == "cold", states
    first, hot, webhooks, deliveries, *tail = ran

    check_woken(first)
    assert hot.status_codes() == [200] and hot.header("Server-Timing") is None, hot
    assert hot.header("X-Allocation-Id") == first.header("X-Allocation-Id")

    # Queued while shop slept, then the same event id again: a duplicate of the first.
    assert webhooks.status_codes() == [202, 202], webhooks
    accepted, duplicate = webhooks.json_bodies()
    assert accepted["duplicate"] is False and duplicate["duplicate"] is True, webhooks
    assert accepted["queued_id"] == duplicate["queued_id"], webhooks

    # Delivered once after the wake, by the replayer.
    listing = deliveries.json_bodies()[0]
    assert listing["count"] == 1, deliveries
    [delivery] = listing["deliveries"]
    assert delivery["event_id"] == "evt_demo_1" and delivery["path"] == "/webhooks/stripe"
    assert delivery["queued_id"] == accepted["queued_id"] and delivery["attempt"] == "1"

    check_common_tail(demo, lines, tail)
    assert tail[-1].header("X-Allocation-Id") != first.header("X-Allocation-Id")
    # Still exactly one delivery at the end (shop slept and woke again meanwhile).
    record = (demo.run_dir / "shop-webhooks.jsonl").read_text().splitlines()
    assert len(record) == 1, record

    stop_and_check_nothing_left(demo)


def test_demo_without_redis_says_queueing_is_off_and_still_wakes(start_demo) -> None:
    demo = start_demo(DEMO_STORE="memory")
    out = demo.output()
    assert "queueing is OFF" in out and "memory://" in out and "1 worker," in out, out
    assert not (demo.run_dir / "redis").exists()
    edge_config = (demo.run_dir / "edge.toml").read_text()
    assert 'class = "queue"' not in edge_config and "[apps.replay]" not in edge_config
    lines = demo.try_lines()
    assert len(lines) == 11, lines

    ran = [demo.run(line) for line in lines]
    first, hot, refused, retried, deliveries, *tail = ran
    check_woken(first)
    assert hot.status_codes() == [200] and hot.header("Server-Timing") is None, hot

    # No queue: the webhook is refused while shop sleeps; the sender's retry gets through.
    assert refused.status_codes() == [503], refused
    assert int(refused.header("Retry-After") or 0) >= 1, refused
    assert retried.status_codes() == [200] and "webhook 200" in retried.out, retried
    listing = deliveries.json_bodies()[0]
    assert listing["count"] == 1 and listing["deliveries"][0]["event_id"] == "evt_demo_1"
    assert listing["deliveries"][0]["queued_id"] == ""  # proxied, never queued

    check_common_tail(demo, lines, tail)
    # hello was just woken: the demo's exit must stop it (the control plane alone would not).
    assert demo.live_app_pids(), "expected a running app process to stop"
    stop_and_check_nothing_left(demo)
