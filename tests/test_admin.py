"""Admin listener: health, readiness, Prometheus metrics (all workers), token, access log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import aiohttp
from helpers import (
    app_entry,
    close,
    connect,
    eventually,
    free_port,
    metric_samples,
    metric_sum,
    read_response,
    request_bytes,
    reset,
    run_edge_cli,
    send,
    to_toml,
)

from edge.ops.admin_token import admin_token_path
from edge.server.config import load_config

HOST = {"Host": "app.localhost"}


async def get(client: aiohttp.ClientSession, url: str, host: str = "app.localhost") -> int:
    async with client.get(url, headers={"Host": host}) as resp:
        await resp.read()
        return resp.status


def test_healthz_and_readyz(start_edge) -> None:
    edge = start_edge()
    assert edge.admin_get("/healthz")[0] == 200
    assert edge.admin_get("/readyz")[0] == 200


async def test_metrics_count_requests_by_app_and_status(start_edge, upstream, client) -> None:
    edge = start_edge(
        apps=[
            app_entry("echo", ["app.localhost"], upstream),
            app_entry("down", ["down.localhost"], f"127.0.0.1:{free_port()}"),
        ]
    )
    for _ in range(5):
        assert await get(client, edge.url + "/echo") == 200
    for _ in range(2):
        assert await get(client, edge.url + "/status/503") == 503
    for _ in range(3):
        assert await get(client, edge.url + "/echo", host="down.localhost") == 502
    assert await get(client, edge.url + "/echo", host="unknown.localhost") == 404

    def counted() -> bool:
        text = edge.metrics()
        return (
            metric_sum(text, "edge_requests_total", app="echo", status="200") == 5
            and metric_sum(text, "edge_requests_total", app="echo", status="503") == 2
            and metric_sum(text, "edge_requests_total", app="down", status="502") == 3
            and metric_sum(text, "edge_requests_total", status="404") == 1
        )

    await eventually(counted, timeout=10, what="edge_requests_total to count every request")
    text = edge.metrics()
    # Nothing counted twice, and no request invented.
    assert metric_sum(text, "edge_requests_total") == 11
    # Latency histogram: one observation per answered request of the app.
    assert metric_sum(text, "edge_request_duration_seconds_count", app="echo") == 7
    buckets = metric_samples(text, "edge_request_duration_seconds_bucket")
    assert any(labels.get("le") == "+Inf" for labels, _ in buckets)
    # Upstream errors by kind: every 502 for the dead upstream was counted with a kind.
    errors = metric_samples(text, "edge_upstream_errors_total")
    assert sum(v for labels, v in errors if labels.get("app") == "down") >= 3
    assert all(labels.get("kind") for labels, _ in errors)


async def test_open_connections_gauge(start_edge, upstream) -> None:
    edge = start_edge()
    conns = [await connect(edge.port) for _ in range(3)]
    try:
        for reader, writer in conns:
            await send(writer, request_bytes("GET", "/echo"))
            assert (await read_response(reader)).status == 200
        await eventually(
            lambda: metric_sum(edge.metrics(), "edge_open_connections") == 3,
            what="edge_open_connections == 3 with three keep-alive clients",
        )
    finally:
        for _, writer in conns:
            await close(writer)
    await eventually(
        lambda: metric_sum(edge.metrics(), "edge_open_connections") == 0,
        what="edge_open_connections back to 0",
    )


async def test_client_leaving_mid_request_does_not_count_as_held(start_edge, upstream) -> None:
    edge = start_edge()
    for _ in range(3):
        _reader, writer = await connect(edge.port)
        await send(writer, request_bytes("GET", "/slow-headers?delay=5"))
        await asyncio.sleep(0.2)  # the request is with the upstream
        reset(writer)  # not a half-close the edge would still answer
    await eventually(
        lambda: metric_sum(edge.metrics(), "edge_requests_total", status="499") == 3,
        what="three requests counted as abandoned by the client",
    )
    await asyncio.sleep(0.8)  # a stats snapshot later
    assert metric_sum(edge.metrics(), "edge_held_requests") == 0


async def test_metrics_cover_all_workers(start_edge, upstream, redis_server) -> None:
    edge = start_edge(workers=2, edge={"store": redis_server})
    n = 40
    # A fresh connection per request, so the kernel spreads them over both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        for i in range(n):
            assert await get(session, edge.url + f"/echo?n={i}") == 200
    assert len(upstream.log()) == n
    await eventually(
        lambda: metric_sum(edge.metrics(), "edge_requests_total", app="echo") == n,
        timeout=15,
        interval=0.2,
        what=f"/metrics to count all {n} requests across both workers",
    )


async def test_access_log_json_lines(start_edge, upstream, client, tmp_path) -> None:
    log_path = tmp_path / "access.log"
    # The client's own X-Request-Id is kept (and logged) only from a trusted proxy.
    trusted = {"trusted_proxies": ["127.0.0.1/32"]}
    edge = start_edge(edge={"access_log": str(log_path), "access_log_sample": 1.0, **trusted})
    request_id = uuid.uuid4().hex
    async with client.get(
        edge.url + "/echo?logged=1", headers={**HOST, "X-Request-Id": request_id}
    ) as resp:
        assert resp.status == 200

    def records() -> list[dict]:
        if not log_path.exists():
            return []
        return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]

    def logged() -> bool:
        return any(r.get("request_id") == request_id for r in records())

    await eventually(logged, timeout=10, what="the request in the access log")
    [record] = [r for r in records() if r.get("request_id") == request_id]
    assert record["method"] == "GET"
    assert record["path"].startswith("/echo")
    assert record["status"] == 200
    assert record["app"] == "echo"


# --------------------------------------------------------------------------- admin token


def _config_text(admin_listen: str, upstream, token: str | None = None) -> str:
    edge = {"listen": f"127.0.0.1:{free_port()}", "admin_listen": admin_listen}
    if token is not None:
        edge["admin_token"] = token
    return to_toml({"edge": edge, "apps": [app_entry("echo", ["app.localhost"], upstream)]})


def test_non_loopback_admin_without_token_refused(tmp_path, upstream) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(_config_text(f"0.0.0.0:{free_port()}", upstream))
    for args in (("check", str(path)), ("run", "--config", str(path))):
        result = run_edge_cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "token" in result.stderr.lower(), result.stderr
        assert str(path) in result.stderr


def test_non_loopback_admin_token_from_config_or_env(tmp_path, upstream) -> None:
    path = tmp_path / "edge.toml"
    secret = f"s3cret-{uuid.uuid4().hex}"
    path.write_text(_config_text(f"0.0.0.0:{free_port()}", upstream, token=secret))
    result = run_edge_cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout, "`edge check` printed the admin token"

    path.write_text(_config_text(f"0.0.0.0:{free_port()}", upstream))
    assert run_edge_cli("check", str(path), env={"EDGE_ADMIN_TOKEN": secret}).returncode == 0


def test_admin_token_required_for_metrics(start_edge) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    edge = start_edge(edge={"admin_listen": f"0.0.0.0:{free_port()}", "admin_token": secret})
    assert edge.admin_get("/metrics")[0] == 200  # EdgeProcess sends the configured token
    edge.admin_token = ""
    assert edge.admin_get("/metrics")[0] == 401
    edge.admin_token = "wrong"
    assert edge.admin_get("/metrics")[0] == 401
    edge.admin_token = secret
    status, body = edge.admin_get("/metrics")
    assert status == 200
    assert b"edge_open_connections" in body


def test_admin_token_from_environment(start_edge) -> None:
    secret = f"env-{uuid.uuid4().hex}"
    edge = start_edge(
        edge={"admin_listen": f"0.0.0.0:{free_port()}"}, env={"EDGE_ADMIN_TOKEN": secret}
    )
    assert edge.admin_get("/metrics")[0] == 200
    edge.admin_token = ""
    assert edge.admin_get("/metrics")[0] == 401


# ------------------------------------------------- mutating calls: a token always


def _admin_call(edge, method: str, path: str, token: str | None) -> int | None:
    """The status of one admin call, with `Authorization: Bearer <token>` unless None."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(edge.admin_url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


MUTATING = [
    ("POST", "/admin/reload"),
    ("DELETE", "/admin/queues/echo/queued"),
    ("DELETE", "/admin/queues/echo/dead/1-1"),
    ("POST", "/admin/queues/echo/dead/1-1/replay"),
]
READS = ["/healthz", "/readyz", "/metrics", "/admin/apps", "/admin/queues", "/admin/routes"]


def test_mutating_admin_calls_need_the_generated_token(start_edge) -> None:
    # Loopback, no admin_token: anything on the host (the apps fronted included)
    # reaches this listener, so only reads are open.
    edge = start_edge()
    for method, path in MUTATING:
        assert _admin_call(edge, method, path, None) == 401, (method, path)
        assert _admin_call(edge, method, path, "wrong") == 401, (method, path)
    for path in READS:
        assert _admin_call(edge, "GET", path, None) == 200, path

    # The token the edge generated at start, in a file only its user can read.
    token_file = admin_token_path(load_config(edge.config_path).edge, edge.config_path)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert token not in edge.output(), "the token itself was logged"
    assert str(token_file) in edge.output(), "the log does not say where the token is"
    assert _admin_call(edge, "POST", "/admin/reload", token) == 200
    # Past the token check: this edge has no queue for the app.
    assert _admin_call(edge, "DELETE", "/admin/queues/echo/queued", token) == 404
    # The operator's tools find it with no extra step.
    result = run_edge_cli("reload", "--config", str(edge.config_path))
    assert result.returncode == 0, result.stderr
    edge.stop()
    assert not token_file.exists(), "a generated token outlived its edge"


def test_workers_agree_on_the_token_and_a_restarted_worker_keeps_it(
    start_edge, redis_server
) -> None:
    edge = start_edge(workers=2, edge={"store": redis_server})
    token_file = admin_token_path(load_config(edge.config_path).edge, edge.config_path)
    token = token_file.read_text().strip()
    assert _admin_call(edge, "POST", "/admin/reload", token) == 200
    # Worker 0 serves the admin listener; killed, the supervisor starts another.
    worker0 = _worker_pid(edge.proc.pid, 0)
    os.kill(worker0, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _worker_pid(edge.proc.pid, 0) in (None, worker0) or edge.admin_get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, edge.output()
        time.sleep(0.1)
    assert token_file.read_text().strip() == token
    assert _admin_call(edge, "POST", "/admin/reload", None) == 401
    assert _admin_call(edge, "POST", "/admin/reload", token) == 200


def _worker_pid(supervisor: int, index: int) -> int | None:
    """The live `edge worker --index N` child of the supervisor, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat_line[stat_line.rfind(")") + 2 :].split()
        if fields[0] in ("Z", "X") or int(fields[1]) != supervisor:
            continue
        if (
            b"worker" in argv
            and b"--index" in argv
            and argv[argv.index(b"--index") + 1] == str(index).encode()
        ):
            return int(entry.name)
    return None


def test_admin_token_from_a_file(start_edge, tmp_path) -> None:
    given = tmp_path / "given.token"
    given.write_text("from-the-operator-file\n")
    given.chmod(0o600)
    edge = start_edge(edge={"admin_token_file": str(given)})
    assert _admin_call(edge, "POST", "/admin/reload", None) == 401
    assert _admin_call(edge, "POST", "/admin/reload", "from-the-operator-file") == 200
    assert _admin_call(edge, "GET", "/metrics", None) == 200
    assert run_edge_cli("reload", "--config", str(edge.config_path)).returncode == 0
    edge.stop()
    assert given.read_text() == "from-the-operator-file\n", "the operator's file was changed"

    # Named but absent: generated and written there (0600), and removed at the end.
    absent = tmp_path / "absent" / "admin.token"
    edge = start_edge(edge={"admin_token_file": str(absent)})
    assert stat.S_IMODE(absent.stat().st_mode) == 0o600
    assert _admin_call(edge, "POST", "/admin/reload", absent.read_text().strip()) == 200
    assert _admin_call(edge, "POST", "/admin/reload", None) == 401
