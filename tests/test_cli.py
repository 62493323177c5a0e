"""`edge run` as a process: bad configs, graceful SIGTERM, several workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    CountingForwarder,
    app_entry,
    close,
    connect,
    eventually,
    exchange,
    free_port,
    read_response,
    request_bytes,
    run_edge_cli,
    send,
    to_toml,
)
from stack import CONTROL_PLANE_TOKEN, sample_app_spec


def test_run_with_bad_config_exits_2(tmp_path: Path, upstream) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(
        to_toml(
            {
                "edge": {"listen": f"127.0.0.1:{free_port()}"},
                "limits": {"header_timeout": "5x"},
                "apps": [app_entry("echo", ["app.localhost"], upstream)],
            }
        )
    )
    result = run_edge_cli("run", "--config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert str(path) in result.stderr
    assert "limits.header_timeout" in result.stderr
    assert "5x" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_missing_config_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = run_edge_cli("run", "--config", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_exits_0_when_idle(start_edge) -> None:
    edge = start_edge()
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.wait(15) == 0


async def test_sigterm_lets_in_flight_request_finish(start_edge, upstream) -> None:
    edge = start_edge(edge={"shutdown_timeout": "30s"})
    key = uuid.uuid4().hex
    reader, writer = await connect(edge.port)
    try:
        await send(writer, request_bytes("GET", f"/hold?id={key}"))
        await eventually(lambda: upstream.state(key) == "waiting", what="request in flight")

        edge.proc.send_signal(signal.SIGTERM)

        # (A probe that races the signal may still be served; the loop waits for refusal.)
        async def new_connections_refused() -> bool:
            try:
                resp = await exchange(
                    edge.port, request_bytes("GET", "/echo?after-sigterm"), timeout=2
                )
            except OSError:
                return True
            return resp is None

        await eventually(new_connections_refused, timeout=10, what="the listener to close")
        # Still running: it is waiting for the in-flight request, not gone already.
        assert edge.proc.poll() is None, edge.output()
        assert upstream.state(key) == "waiting"

        upstream.release(key)
        resp = await read_response(reader, timeout=10)
        assert resp.status == 200
        assert resp.body == b"released\n"
    finally:
        await close(writer)
    assert await asyncio.to_thread(edge.wait, 15) == 0


async def test_sigterm_deadline_ends_stuck_requests(start_edge, upstream) -> None:
    edge = start_edge(edge={"shutdown_timeout": "1s"})
    key = uuid.uuid4().hex
    _, writer = await connect(edge.port)
    try:
        await send(writer, request_bytes("GET", f"/hold?id={key}"))
        await eventually(lambda: upstream.state(key) == "waiting", what="request in flight")
        edge.proc.send_signal(signal.SIGTERM)
        # Never released: the edge must give up at its deadline and still exit 0.
        assert await asyncio.to_thread(edge.wait, 15) == 0
    finally:
        await close(writer)
    await eventually(
        lambda: upstream.state(key) == "cancelled", what="upstream request cancelled at exit"
    )


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _owners_of_accepted_sockets(port: int, pids: set[int]) -> dict[int, int]:
    """{pid: number of established sockets on local `port`} among `pids`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(fields[9])
    owners: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners[pid] = owners.get(pid, 0) + 1
    return owners


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
async def test_two_workers_both_serve(start_edge, upstream, redis_server) -> None:
    edge = start_edge(workers=2, edge={"store": redis_server})
    conns = []
    try:
        for i in range(40):
            reader, writer = await connect(edge.port)
            conns.append(writer)
            await send(writer, request_bytes("GET", f"/echo?worker-probe={i}"))
            assert (await read_response(reader)).status == 200
        owners = _owners_of_accepted_sockets(edge.port, _descendants(edge.proc.pid))
    finally:
        for writer in conns:
            await close(writer)
    assert sum(owners.values()) == 40, owners
    assert len(owners) == 2, f"client connections by process: {owners}"
    assert len(upstream.log()) == 40


async def test_status_prints_every_app(start_control_plane, start_edge, upstream) -> None:
    slow = sample_app_spec("slow")
    slow["command"] = [*slow["command"], "--start-delay", "30"]  # starting for the whole test
    cp = start_control_plane(apps=[sample_app_spec("shop"), sample_app_spec("cart"), slow])
    cold = {"scale_to_zero": True, "hold_timeout": "20s", "readiness_timeout": "15s"}
    edge = start_edge(
        apps=[
            app_entry("echo", ["app.localhost"], upstream),
            {"name": "shop", "hosts": ["shop.localhost"], **cold},
            {"name": "cart", "hosts": ["cart.localhost"], **cold},
            {"name": "slow", "hosts": ["slow.localhost"], **cold},
        ],
        edge={"admin_token": "status-secret"},
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(edge.url + "/", headers={"Host": "shop.localhost"}) as resp:
            assert resp.status == 200
        async with session.post(edge.url + "/", headers={"Host": "cart.localhost"}) as resp:
            assert resp.status == 503  # not safe to hold; starts cart's wake
    await asyncio.sleep(0.6)  # a stats snapshot later
    result = run_edge_cli("status", "--config", str(edge.config_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("wake budget: ")
    rows = {
        line.split()[0]: line.split()
        for line in lines
        if line.split()[:1] in (["echo"], ["shop"], ["cart"], ["slow"])
    }
    assert set(rows) == {"echo", "shop", "cart", "slow"}
    assert rows["shop"][1] == "hot" and rows["echo"][1] == "hot"
    assert "not_safe_to_hold 1" in result.stdout
    assert "503s in the last 2s, by reason: none" in result.stdout

    # The command reaches the admin API through a forwarder, so the refusal is sent once
    # its first /metrics has gone out (inside its window), however slowly it started.
    async with CountingForwarder(edge.admin_port, b"GET /metrics ") as forwarder:
        watched = edge.config_path.with_name("watched.toml")
        watched.write_text(
            edge.config_path.read_text().replace(
                f"127.0.0.1:{edge.admin_port}", f"127.0.0.1:{forwarder.port}"
            )
        )

        async def refuse_inside_the_window() -> None:
            await eventually(
                lambda: forwarder.count >= 1, timeout=20, what="the command's first /metrics"
            )
            async with (
                aiohttp.ClientSession() as session,
                session.post(edge.url + "/", headers={"Host": "slow.localhost"}) as resp,
            ):
                assert resp.status == 503

        command = asyncio.to_thread(
            run_edge_cli, "status", "--config", str(watched), "--json", "--window", "5"
        )
        finished, _ = await asyncio.gather(command, refuse_inside_the_window())
    assert forwarder.count == 2, finished.stderr  # before and after the window
    as_json = json.loads(finished.stdout)
    assert {app["name"] for app in as_json["apps"]} == {"echo", "shop", "cart", "slow"}
    assert as_json["rejections_by_reason"] == {"not_safe_to_hold": 2}
    assert as_json["recent_rejections_by_reason"] == {"not_safe_to_hold": 1}
    assert as_json["budget"]["limit"] == 20
    # A wrong token is refused with a clear message, not a traceback.
    bad = edge.config_path.read_text().replace("status-secret", "wrong-secret")
    wrong = edge.config_path.with_name("wrong.toml")
    wrong.write_text(bad)
    refused = run_edge_cli("status", "--config", str(wrong))
    assert refused.returncode == 2 and "401" in refused.stderr and "Traceback" not in refused.stderr
