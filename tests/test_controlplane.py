"""The local control plane (`edge controlplane`) against real subprocesses.

Every test starts the real server (the conftest.py fixture `start_control_plane`) on a
free 127.0.0.1 port with its own SQLite file, and the allocations it creates are
real bench/apps/sample_app.py processes. The journal (GET /v1/journal) is the
witness of the exact sequence of states each machine went through. Waits poll
with deadlines; assertions are about behaviour, never about speed.

Bad input to every endpoint lives in test_controlplane_api.py.

Moves of machines.py driven here through the API (journal-checked):
- allocation: planned->pulling->starting->ready->draining->stopped; pulling->draining;
  starting->draining; pulling->failed (digest, secret); starting->failed (readiness
  timeout, exit); ready->failed (crash, OOM, dead across a restart).
- host_drain: every move but replacement_ready->uncordoned (the local host passes
  through replacement_ready without waiting, so nothing can interrupt it there).
- promotion: the happy path, edge_propagating->rolled_back, policy_check->failed,
  route_cas->failed.
- region: the bring-up to eligible or (artifact absent) disabled, eligible->disabled,
  disabled->eligible.
Not drivable from outside: planned->draining/failed (planned is left at once) and
moves into `failed` from states the server passes through without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controlplane_client import POLL, WAIT, app
from stack import SAMPLE_APP

from scheduler_client.local.store import ControlPlaneStore
from scheduler_client.machine_move import JournalEntry
from scheduler_client.models import Region

pytestmark = pytest.mark.timeout(90)

ALLOCATION_HAPPY_PATH = ["planned", "pulling", "starting", "ready", "draining", "stopped"]
PROMOTION_HAPPY_PATH = ["requested", "policy_check", "route_cas", "edge_propagating", "healthy"]
HOST_DRAIN_PATH = [
    "uncordoned",
    "cordoned",
    "evacuating",
    "replacement_ready",
    "upgrading",
    "postcheck",
    "uncordoned",
]
REGION_BRINGUP = ["requested", "provisioning", "binding_services", "replicating_artifacts"]


def pid_alive(pid: int) -> bool:
    """The pid runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def app_processes(allocation_id: str) -> list[int]:
    """Live sample-app processes started for `allocation_id` (from /proc cmdlines)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = str(SAMPLE_APP).encode() in argv and allocation_id.encode() in argv
        if ours and pid_alive(int(entry)):
            found.append(int(entry))
    return found


async def wait_gone(pid: int, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {timeout}s"
        await asyncio.sleep(POLL)


async def app_get(
    session: aiohttp.ClientSession, alloc: dict[str, Any], path: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.get(f"http://{alloc['address']}{path}") as resp:
        return resp.status, dict(resp.headers), await resp.read()


# ----------------------------------------------------------- allocation machine


async def test_allocation_walks_planned_to_stopped(api_for, client) -> None:
    api = api_for()
    created = await api.create()
    assert created["state"] == "planned" and created["app"] == "hello"
    alloc = await api.alloc_until(created["id"], "ready")
    assert alloc["address"].startswith("127.0.0.1:") and alloc["pid"] > 0
    assert alloc["artifact_digest"].startswith("sha256:")

    # Really serving, and it names its allocation.
    status, headers, body = await app_get(client, alloc, "/")
    assert status == 200 and headers["X-Allocation-Id"] == alloc["id"], (headers, body)
    route = await api.route_of()
    assert route is not None
    assert [(t["allocation_id"], t["state"]) for t in route["targets"]] == [(alloc["id"], "ready")]

    drained = await api.ok("POST", f"/v1/allocations/{alloc['id']}/drain", {"deadline_s": 0})
    assert drained["state"] == "draining"
    stopped = await api.alloc_until(alloc["id"], "stopped")
    assert stopped["reason"] == "drained" and stopped["active_sessions_at_deadline"] == 0
    assert stopped["reason_code"] == "", stopped
    await wait_gone(alloc["pid"])
    assert await api.path(alloc["id"]) == ALLOCATION_HAPPY_PATH
    route = await api.route_of()
    assert route is not None and route["targets"] == []

    # Draining or stopping an allocation that already ended changes nothing.
    again = await api.ok("POST", f"/v1/allocations/{alloc['id']}/stop")
    assert again["state"] == "stopped" and again["version"] == stopped["version"]
    assert await api.path(alloc["id"]) == ALLOCATION_HAPPY_PATH


async def test_stop_of_a_starting_allocation_drains_it(api_for) -> None:
    api = api_for([app("hello", "--start-delay", "30")])
    created = await api.create()
    starting = await api.until(
        lambda: api.allocation(created["id"]),
        lambda a: a["state"] == "starting" and a["pid"],
        "a starting allocation with a process",
    )
    assert pid_alive(starting["pid"])
    await api.ok("POST", f"/v1/allocations/{created['id']}/stop")
    stopped = await api.alloc_until(created["id"], "stopped", "failed")
    assert stopped["state"] == "stopped", stopped
    await wait_gone(starting["pid"])
    assert await api.path(created["id"]) == [
        "planned",
        "pulling",
        "starting",
        "draining",
        "stopped",
    ]


async def test_drain_while_pulling(api_for, tmp_path) -> None:
    """A big artifact keeps the allocation in `pulling` while its digest is computed;
    draining it then never starts a process."""
    artifact = tmp_path / "big-artifact"
    with artifact.open("wb") as f:
        f.truncate(256 * 1024 * 1024)  # sparse: no disk, but hashing it takes a while
    api = api_for([app("hello", artifact=str(artifact))])
    created = await api.create()
    # The first change after `planned` is the move to `pulling`.
    pulling = await api.ok("GET", f"/v1/allocations/{created['id']}/watch?version=1&timeout=10")
    if pulling["state"] != "pulling":
        pytest.skip(f"hashing finished before the drain could be sent: {pulling['state']}")
    await api.ok("POST", f"/v1/allocations/{created['id']}/drain", {"deadline_s": 0})
    stopped = await api.alloc_until(created["id"], "stopped", "failed")
    assert stopped["state"] == "stopped", stopped
    assert stopped["pid"] is None and app_processes(created["id"]) == []
    assert await api.path(created["id"]) == ["planned", "pulling", "draining", "stopped"]


async def test_digest_mismatch_and_missing_secret_fail_while_pulling(api_for) -> None:
    os.environ.pop("NOT_SET_ANYWHERE", None)
    api = api_for(
        [
            app("tampered", digest="sha256:" + "0" * 64),
            app("secretive", secrets=["NOT_SET_ANYWHERE"]),
        ]
    )
    tampered = await api.create("tampered")
    secretive = await api.create("secretive")
    failed = await api.alloc_until(tampered["id"], "failed", "ready")
    assert failed["reason"].startswith("build digest mismatch"), failed
    assert failed["reason_code"] == "build_digest_mismatch", failed
    assert "0" * 64 in failed["reason"]
    failed = await api.alloc_until(secretive["id"], "failed", "ready")
    assert failed["reason"].startswith("secret missing"), failed
    assert failed["reason_code"] == "secret_missing", failed
    assert "NOT_SET_ANYWHERE" in failed["reason"]
    for alloc in (tampered, secretive):
        assert await api.path(alloc["id"]) == ["planned", "pulling", "failed"]
        assert (await api.allocation(alloc["id"]))["pid"] is None
        assert app_processes(alloc["id"]) == []
    assert await api.route_of("tampered") is None and await api.route_of("secretive") is None


async def test_an_app_gets_its_own_environment_not_the_platforms(
    api_for, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the control plane's own environment holds besides its token: a platform
    # secret, and the secrets of two apps.
    monkeypatch.setenv("PLATFORM_DB_PASSWORD", "platform-only")
    monkeypatch.setenv("HELLO_API_KEY", "for-hello")
    monkeypatch.setenv("OTHER_API_KEY", "for-other")
    api = api_for(
        [
            app("hello", env={"MODE": "demo"}, secrets=["HELLO_API_KEY"]),
            app("other", secrets=["OTHER_API_KEY"]),
        ]
    )
    hello = await api.alloc_until((await api.create("hello"))["id"], "ready")
    other = await api.alloc_until((await api.create("other"))["id"], "ready")
    seen = {}
    for alloc in (hello, other):
        status, _, body = await app_get(client, alloc, "/env")
        assert status == 200, body
        seen[alloc["app"]] = json.loads(body)
    names = set(seen["hello"]["names"])
    for platform in ("CONTROL_PLANE_TOKEN", "PLATFORM_DB_PASSWORD", "OTHER_API_KEY"):
        assert platform not in names, (platform, sorted(names))
    assert {"HELLO_API_KEY", "MODE", "ALLOCATION_ID", "PORT", "PATH", "HOME"} <= names, names
    assert "CONTROL_PLANE_TOKEN" not in seen["other"]["names"]
    assert "HELLO_API_KEY" not in seen["other"]["names"]
    assert "OTHER_API_KEY" in seen["other"]["names"]
    # A HOME of each app's own under the control plane's state folder, not the operator's.
    state_dir = Path(api.cp.state_file).parent.resolve()
    homes = [Path(seen[name]["home"]) for name in ("hello", "other")]
    assert homes[0] != homes[1], homes
    for home in homes:
        assert home.is_dir() and state_dir in home.parents, (home, state_dir)
        assert home != Path(os.path.expanduser("~"))


async def test_runner_crash_fails_and_removes_the_route_target(api_for, client) -> None:
    api = api_for()
    alloc = await api.ready()
    before = await api.route_of()
    assert before is not None and [t["allocation_id"] for t in before["targets"]] == [alloc["id"]]

    status, _, _ = await app_get(client, alloc, "/crash?code=3")
    assert status == 200
    failed = await api.alloc_until(alloc["id"], "failed", "stopped")
    assert failed["state"] == "failed"
    assert failed["reason"].startswith("runner crash") and "3" in failed["reason"], failed
    assert failed["reason_code"] == "runner_crash", failed
    await wait_gone(alloc["pid"])
    after = await api.route_of()
    assert after is not None and after["targets"] == []
    assert after["epoch"] > before["epoch"]
    changes = await api.ok("GET", f"/v1/routes/changes?after={before['epoch']}&timeout=0")
    assert changes["changes"][-1]["route"]["targets"] == []
    assert await api.path(alloc["id"]) == ["planned", "pulling", "starting", "ready", "failed"]


async def test_memory_limit_exceeded_is_oom(api_for, client) -> None:
    api = api_for([app("hello", memory_limit="64MiB")])
    alloc = await api.ready()
    # The app may be killed before it answers.
    with contextlib.suppress(aiohttp.ClientError):
        await app_get(client, alloc, "/leak?mb=128")
    failed = await api.alloc_until(alloc["id"], "failed", "stopped")
    assert failed["state"] == "failed" and failed["reason"].startswith("OOM"), failed
    assert failed["reason_code"] == "oom", failed
    await wait_gone(alloc["pid"])
    assert await api.path(alloc["id"]) == ["planned", "pulling", "starting", "ready", "failed"]


async def test_readiness_timeout_and_exit_while_starting_fail(api_for) -> None:
    api = api_for(
        [
            app("hello", "--start-delay", "30", start_timeout="1s"),
            # The app refuses its arguments and exits 2 before it is ever ready.
            app("broken", "--start-delay", "not-a-number"),
        ]
    )
    created = await api.create()
    broken = await api.create("broken")
    failed = await api.alloc_until(created["id"], "failed", "ready")
    assert failed["reason"].startswith("readiness timeout"), failed
    assert failed["reason_code"] == "health_readiness_pass", failed
    await wait_gone(failed["pid"])
    crashed = await api.alloc_until(broken["id"], "failed", "ready")
    assert crashed["reason"].startswith("runner crash") and "2" in crashed["reason"], crashed
    assert crashed["reason_code"] == "runner_crash", crashed
    for alloc in (created, broken):
        assert await api.path(alloc["id"]) == ["planned", "pulling", "starting", "failed"]


async def test_session_active_at_drain_deadline_is_cut_and_recorded(api_for, client) -> None:
    api = api_for()
    alloc = await api.ready()
    async with client.ws_connect(f"http://{alloc['address']}/ws") as ws:
        await ws.send_str("ping")
        assert (await ws.receive(timeout=10)).data == "ping"
        await api.ok("POST", f"/v1/allocations/{alloc['id']}/drain", {"deadline_s": 1})
        stopped = await api.alloc_until(alloc["id"], "stopped", "failed")
        # The app closes the session as "going away" when told to stop.
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
        if closing.type is aiohttp.WSMsgType.CLOSE:
            assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
    assert stopped["state"] == "stopped", stopped
    assert stopped["active_sessions_at_deadline"] >= 1, stopped
    assert "session still active" in stopped["reason"], stopped
    assert stopped["reason_code"] == "session_still_active_at_drain_deadline", stopped
    assert await api.path(alloc["id"]) == ALLOCATION_HAPPY_PATH


async def test_no_headroom(api_for) -> None:
    api = api_for(max_allocations=1)
    first = await api.create()
    message = await api.error(
        503, "POST", "/v1/allocations", {"app": "hello"}, reason_code="no_headroom"
    )
    assert "no headroom" in message
    # Once the first one has ended there is room again.
    await api.ok("POST", f"/v1/allocations/{first['id']}/stop")
    await api.alloc_until(first["id"], "stopped", "failed")
    second = await api.create()
    assert second["id"] != first["id"]
    assert len(await api.allocations()) == 2


async def test_fifty_concurrent_identical_creates_make_one_process(api_for, client) -> None:
    api = api_for()
    body = {"app": "hello", "idempotency_key": "deploy-42"}

    async def create() -> tuple[int, dict[str, Any]]:
        return await api.call("POST", "/v1/allocations", body)

    answers = await asyncio.gather(*(create() for _ in range(50)))
    ids = {data["id"] for _, data in answers}
    assert len(ids) == 1, ids
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 49 + [201], statuses
    (allocation_id,) = ids
    alloc = await api.alloc_until(allocation_id, "ready")

    listed = await api.allocations()
    assert [a["id"] for a in listed] == [allocation_id]
    assert app_processes(allocation_id) == [alloc["pid"]]
    # The same key later still answers the same allocation, without a new process.
    again = await api.create(key="deploy-42")
    assert again["id"] == allocation_id
    assert len(await api.allocations()) == 1
    assert app_processes(allocation_id) == [alloc["pid"]]
    # A different key is a different allocation.
    other = await api.create(key="deploy-43")
    assert other["id"] != allocation_id


async def test_watch_returns_on_change_and_at_timeout(api_for) -> None:
    api = api_for([app("hello", "--start-delay", "1")])
    created = await api.create()
    # `starting` with its pid recorded: the next change is the move to `ready`.
    starting = await api.until(
        lambda: api.allocation(created["id"]),
        lambda a: a["state"] == "starting" and a["pid"],
        "a starting allocation with a process",
    )
    version = starting["version"]
    watched = await api.ok(
        "GET", f"/v1/allocations/{created['id']}/watch?version={version}&timeout=20"
    )
    assert watched["version"] > version and watched["state"] == "ready", watched

    # Nothing changes: at the timeout the unchanged allocation comes back.
    began = time.monotonic()
    same = await api.ok(
        "GET", f"/v1/allocations/{created['id']}/watch?version={watched['version']}&timeout=1"
    )
    assert time.monotonic() - began >= 0.9
    assert same == watched
    # An old version answers at once with the current allocation.
    current = await api.ok("GET", f"/v1/allocations/{created['id']}/watch?version=0&timeout=20")
    assert current == watched


async def test_restart_adopts_live_allocations_and_fails_dead_ones(api_for, client) -> None:
    api = api_for()
    live = await api.ready()
    doomed = await api.ready()
    epoch_before = (await api.routes())["epoch"]

    api.cp.kill()  # no chance to clean anything up
    os.kill(doomed["pid"], signal.SIGKILL)
    await wait_gone(doomed["pid"])
    api.cp.start()

    failed = await api.alloc_until(doomed["id"], "failed", "ready")
    assert failed["state"] == "failed" and failed["reason"].startswith("runner crash"), failed
    adopted = await api.allocation(live["id"])
    assert adopted["state"] == "ready" and adopted["pid"] == live["pid"], adopted
    assert pid_alive(live["pid"])
    status, headers, _ = await app_get(client, adopted, "/")
    assert status == 200 and headers["X-Allocation-Id"] == live["id"]
    assert app_processes(live["id"]) == [live["pid"]]
    assert await api.path(live["id"]) == ["planned", "pulling", "starting", "ready"]
    assert await api.path(doomed["id"]) == ["planned", "pulling", "starting", "ready", "failed"]
    routes = await api.routes()
    assert routes["epoch"] > epoch_before
    route = await api.route_of()
    assert route is not None and [t["allocation_id"] for t in route["targets"]] == [live["id"]]

    # The adopted process is watched like a child: its crash is noticed.
    with contextlib.suppress(aiohttp.ClientError):
        await app_get(client, adopted, "/crash?code=5")
    crashed = await api.alloc_until(live["id"], "failed", "stopped")
    assert crashed["state"] == "failed" and crashed["reason"].startswith("runner crash")


# ------------------------------------------------------------------ region


async def test_region_is_brought_up_then_disabled_and_enabled(api_for) -> None:
    api = api_for()
    region = await api.region()
    assert region["name"] == "local" and region["state"] == "eligible"
    assert await api.path("local", "region") == [*REGION_BRINGUP, "eligible"]

    disabled = await api.ok("PUT", "/v1/region", {"state": "disabled", "reason": "maintenance"})
    assert disabled["state"] == "disabled" and disabled["reason"] == "maintenance"
    assert (await api.routes())["region"]["state"] == "disabled"
    message = await api.error(503, "POST", "/v1/allocations", {"app": "hello"})
    assert "disabled" in message and "maintenance" in message, message
    assert await api.allocations() == []

    # A state the API does not let a caller set is refused.
    for state in ("requested", "provisioning", "replicating_artifacts"):
        await api.error(400, "PUT", "/v1/region", {"state": state})
    assert (await api.region())["state"] == "disabled"

    enabled = await api.ok("PUT", "/v1/region", {"state": "eligible"})
    assert enabled["state"] == "eligible"
    await api.ready()
    assert await api.path("local", "region") == [
        *REGION_BRINGUP,
        "eligible",
        "disabled",
        "eligible",
    ]


async def test_region_disabled_when_an_artifact_is_absent(api_for, tmp_path) -> None:
    api = api_for([app("hello"), app("ghost", artifact=str(tmp_path / "no-such-artifact"))])
    region = await api.region()
    assert region["state"] == "disabled", region
    assert region["reason"].startswith("artifact absent") and "ghost" in region["reason"]
    assert region["reason_code"] == "artifact_absent", region
    assert await api.path("local", "region") == [*REGION_BRINGUP, "disabled"]
    message = await api.error(
        503, "POST", "/v1/allocations", {"app": "hello"}, reason_code="artifact_absent"
    )
    assert "artifact absent" in message


# --------------------------------------------------------------------- host


async def test_cordon_uncordon_and_a_refused_drain(api_for) -> None:
    api = api_for()
    host = await api.host()
    assert host["state"] == "uncordoned"
    assert [h["name"] for h in (await api.ok("GET", "/v1/hosts"))["hosts"]] == ["local"]

    message = await api.error(409, "POST", "/v1/hosts/local/drain", {"replace": False})
    assert "cordon" in message
    assert (await api.host())["state"] == "uncordoned"

    cordoned = await api.ok("POST", "/v1/hosts/local/cordon")
    assert cordoned["state"] == "cordoned"
    assert (await api.ok("POST", "/v1/hosts/local/cordon"))["state"] == "cordoned"
    message = await api.error(503, "POST", "/v1/allocations", {"app": "hello"})
    assert "cordoned" in message

    uncordoned = await api.ok("POST", "/v1/hosts/local/uncordon")
    assert uncordoned["state"] == "uncordoned"
    assert (await api.ok("POST", "/v1/hosts/local/uncordon"))["state"] == "uncordoned"
    await api.create()
    assert await api.path("local", "host_drain") == ["uncordoned", "cordoned", "uncordoned"]


async def test_host_drain_evacuates_and_walks_back_to_uncordoned(api_for) -> None:
    api = api_for()
    alloc = await api.ready()
    await api.ok("POST", "/v1/hosts/local/cordon")
    route = await api.route_of()
    assert route is not None and route["targets"][0]["host_state"] == "cordoned"

    evacuating = await api.ok("POST", "/v1/hosts/local/drain", {"deadline_s": 0, "replace": False})
    assert evacuating["state"] == "evacuating"
    host = await api.until(api.host, lambda h: h["state"] == "uncordoned", "host uncordoned")
    assert host["allocations"] == 0 and all(g["passed"] for g in host["gates"]), host
    stopped = await api.allocation(alloc["id"])
    assert stopped["state"] == "stopped", stopped
    await wait_gone(alloc["pid"])
    assert await api.path("local", "host_drain") == HOST_DRAIN_PATH
    assert await api.path(alloc["id"]) == ALLOCATION_HAPPY_PATH
    await api.create()  # open for business again


async def test_host_drain_with_replacement_stalls_on_no_headroom(api_for) -> None:
    api = api_for()
    alloc = await api.ready()
    await api.ok("POST", "/v1/hosts/local/cordon")
    await api.ok("POST", "/v1/hosts/local/drain", {"deadline_s": 0, "replace": True})
    host = await api.until(api.host, lambda h: "no headroom" in h["reason"], "no headroom")
    assert host["state"] == "evacuating", host
    message = await api.error(409, "POST", "/v1/hosts/local/drain", {"replace": False})
    assert "evacuating" in message
    assert host["reason_code"] == "no_headroom", host
    gates = {g["name"]: g["passed"] for g in host["gates"]}
    assert gates["runner headroom exists"] is False, host
    assert {g["id"]: g["passed"] for g in host["gates"]}["runner_headroom_exists"] is False
    assert (await api.allocation(alloc["id"]))["state"] == "stopped"
    entries = await api.journal("local", "host_drain")
    assert any(
        e["from_state"] == e["to_state"] == "evacuating"
        and "no headroom" in e["reason"]
        and e["reason_code"] == "no_headroom"
        for e in entries
    ), entries

    uncordoned = await api.ok("POST", "/v1/hosts/local/uncordon")
    assert uncordoned["state"] == "uncordoned"
    assert await api.path("local", "host_drain") == [
        "uncordoned",
        "cordoned",
        "evacuating",
        "uncordoned",
    ]
    await api.create()


# ---------------------------------------------------------------- promotion


async def test_promotion_without_edges_is_healthy_and_drains_the_previous(api_for) -> None:
    api = api_for()
    old = await api.ready()
    new = await api.ready()
    route = await api.route_of()
    assert route is not None
    assert {t["allocation_id"] for t in route["targets"]} == {old["id"], new["id"]}

    promotion = await api.promote(new["id"])
    assert promotion["state"] == "requested"
    done = await api.promotion_until(promotion["id"], "healthy", "failed", "rolled_back")
    assert done["state"] == "healthy", done
    assert done["from_epoch"] == route["epoch"] and done["to_epoch"] > route["epoch"]
    assert done["waiting_for"] == [] and sorted(done["previous_allocations"]) == sorted(
        [old["id"], new["id"]]
    )
    assert await api.path(promotion["id"]) == PROMOTION_HAPPY_PATH
    route = await api.route_of()
    assert route is not None and [t["allocation_id"] for t in route["targets"]] == [new["id"]]
    # The allocation it replaced is drained; the promoted one keeps running.
    await api.alloc_until(old["id"], "draining", "stopped")
    assert (await api.allocation(new["id"]))["state"] == "ready"


async def test_promotion_fails_on_a_stale_epoch_and_on_an_allocation_not_ready(api_for) -> None:
    api = api_for()
    alloc = await api.ready()
    route = await api.route_of()
    assert route is not None

    stale = await api.promote(alloc["id"], expected_epoch=route["epoch"] - 1)
    failed = await api.promotion_until(stale["id"], "failed", "healthy", "rolled_back")
    assert failed["state"] == "failed" and "route epoch conflict" in failed["reason"], failed
    assert failed["reason_code"] == "route_epoch_conflict", failed
    assert await api.path(stale["id"]) == ["requested", "policy_check", "route_cas", "failed"]
    assert await api.route_of() == route  # nothing changed

    await api.ok("POST", f"/v1/allocations/{alloc['id']}/stop")
    await api.alloc_until(alloc["id"], "stopped")
    gone = await api.promote(alloc["id"])
    failed = await api.promotion_until(gone["id"], "failed", "healthy", "rolled_back")
    assert "not" in failed["reason"] or "stopped" in failed["reason"], failed
    assert await api.path(gone["id"]) == ["requested", "policy_check", "failed"]


async def test_promotion_waits_for_approval(api_for) -> None:
    api = api_for([app("gated", approval_required=True)])
    alloc = await api.ready("gated")
    promotion = await api.promote(alloc["id"], "gated")
    assert promotion["approval_required"] is True and promotion["approved"] is False
    waiting = await api.promotion_until(promotion["id"], "policy_check")
    # It stays there: nothing but an approval moves it on.
    await asyncio.sleep(0.5)
    waiting = await api.promotion(promotion["id"])
    assert waiting["state"] == "policy_check" and waiting["approved"] is False, waiting

    approved = await api.ok("POST", f"/v1/promotions/{promotion['id']}/approve")
    assert approved["approved"] is True
    done = await api.promotion_until(promotion["id"], "healthy", "failed", "rolled_back")
    assert done["state"] == "healthy", done
    assert await api.path(promotion["id"]) == PROMOTION_HAPPY_PATH
    # Approving again is harmless.
    assert (await api.ok("POST", f"/v1/promotions/{promotion['id']}/approve"))["state"] == "healthy"


async def test_edge_acks_make_healthy_a_silent_edge_rolls_back_and_reports_late(api_for) -> None:
    api = api_for()
    alloc = await api.ready()
    edge = await api.ok("POST", "/v1/edges", {"edge_id": "edge-e"})
    assert edge["edge_id"] == "edge-e" and edge["live"] is True

    # 1. The edge follows the change feed and acks: healthy.
    first = await api.promote(alloc["id"])
    propagating = await api.promotion_until(first["id"], "edge_propagating", "healthy", "failed")
    assert propagating["state"] == "edge_propagating", propagating
    assert propagating["waiting_for"] == ["edge-e"]
    feed = await api.ok(
        "GET",
        f"/v1/routes/changes?after={propagating['from_epoch']}&timeout=5&edge_id=edge-e",
    )
    assert feed["changes"][-1]["epoch"] == propagating["to_epoch"]
    assert [t["allocation_id"] for t in feed["changes"][-1]["route"]["targets"]] == [alloc["id"]]
    acked = await api.ok(
        "POST", "/v1/edges/edge-e/ack", {"edge_id": "edge-e", "epoch": propagating["to_epoch"]}
    )
    assert acked["acked_epoch"] == propagating["to_epoch"]
    healthy = await api.promotion_until(first["id"], "healthy", "rolled_back", "failed")
    assert healthy["state"] == "healthy" and healthy["acked_by"] == ["edge-e"], healthy
    assert await api.path(first["id"]) == PROMOTION_HAPPY_PATH

    # 2. The edge stays silent: rolled back, the previous route restored at a new epoch.
    second = await api.promote(alloc["id"], propagation_timeout_s=1)
    rolled = await api.promotion_until(second["id"], "rolled_back", "healthy", "failed")
    assert rolled["state"] == "rolled_back", rolled
    assert "edge-e" in rolled["reason"] and rolled["late_reports"] == 0, rolled
    assert rolled["reason_code"] == "edge_replay_gap", rolled
    assert await api.path(second["id"]) == [*PROMOTION_HAPPY_PATH[:-1], "rolled_back"]
    route = await api.route_of()
    assert route is not None and route["epoch"] > rolled["to_epoch"]
    assert [t["allocation_id"] for t in route["targets"]] == rolled["previous_allocations"]

    # 3. Its ack arrives after the end: recorded as a late report, nothing else changes.
    current = (await api.routes())["epoch"]
    await api.ok("POST", "/v1/edges/edge-e/ack", {"edge_id": "edge-e", "epoch": current})
    late = await api.promotion(second["id"])
    assert late["state"] == "rolled_back" and late["late_reports"] == 1, late
    # The promotion keeps why it ended; the report is in the journal.
    assert (late["reason"], late["reason_code"]) == (rolled["reason"], "edge_replay_gap"), late
    entries = await api.journal(second["id"])
    assert any(
        "late worker report" in e["reason"] and e["reason_code"] == "late_worker_report"
        for e in entries
    ), entries
    assert await api.route_of() == route
    # The same ack retried is the same report, not another one.
    await api.ok("POST", "/v1/edges/edge-e/ack", {"edge_id": "edge-e", "epoch": current})
    assert (await api.promotion(second["id"]))["late_reports"] == 1
    assert (await api.promotion(first["id"]))["late_reports"] == 0
    assert await api.path(second["id"]) == [*PROMOTION_HAPPY_PATH[:-1], "rolled_back"]


# ------------------------------------------------------------------- routes


async def test_route_cas_conflict_and_410_on_an_expired_epoch(api_for) -> None:
    api = api_for(route_history=2)
    assert (await api.routes())["epoch"] == 0
    expected = 0
    for _ in range(4):
        route = await api.ok(
            "POST",
            "/v1/routes/cas",
            {"app": "hello", "expected_epoch": expected, "allocation_ids": []},
        )
        assert route["epoch"] > expected
        expected = route["epoch"]

    message = await api.error(
        409,
        "POST",
        "/v1/routes/cas",
        {"app": "hello", "expected_epoch": 1, "allocation_ids": []},
        reason_code="route_epoch_conflict",
    )
    assert "route epoch conflict" in message
    assert (await api.route_of())["epoch"] == expected  # type: ignore[index]

    current = (await api.routes())["epoch"]
    assert current == expected == 4
    message = await api.error(
        410, "GET", "/v1/routes/changes?after=0&timeout=0", reason_code="edge_replay_gap"
    )
    assert "resync" in message
    recent = await api.ok("GET", f"/v1/routes/changes?after={current - 1}&timeout=0")
    assert recent["epoch"] == current
    assert [c["epoch"] for c in recent["changes"]] == [current]
    nothing = await api.ok("GET", f"/v1/routes/changes?after={current}&timeout=0")
    assert nothing == {"epoch": current, "changes": []}
    await api.error(410, "GET", f"/v1/routes/changes?after={current + 1}&timeout=0")


# -------------------------------------------------------------------- store


def test_a_state_file_from_before_reason_codes_keeps_its_journal(tmp_path: Path) -> None:
    """An older journal table (no reason_code column) gains the column, rows intact."""
    path = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
            " machine TEXT NOT NULL, subject TEXT NOT NULL, from_state TEXT NOT NULL,"
            " to_state TEXT NOT NULL, reason TEXT NOT NULL)"
        )
        db.execute(
            "INSERT INTO journal (at, machine, subject, from_state, to_state, reason)"
            " VALUES (1.0, 'region', 'local', '', 'requested', '')"
        )
        db.commit()
    store = ControlPlaneStore(path)
    try:
        disabled = JournalEntry(
            machine="region",
            subject="local",
            from_state="requested",
            to_state="disabled",
            reason="artifact absent: x",
            reason_code="artifact_absent",
            at=2.0,
        )
        store.save(Region(name="local", state="disabled"), disabled)
        entries = store.journal_entries("local")
    finally:
        store.close()
    assert [(e.to_state, e.reason_code) for e in entries] == [
        ("requested", ""),
        ("disabled", "artifact_absent"),
    ]
