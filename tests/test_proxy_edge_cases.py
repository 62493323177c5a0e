"""Edge cases of the proxy core against raw upstreams: timeouts, stale pooled connections,
trailers, memory bounds, HTTP/1.0, Expect, pipelining, tunnels, request smuggling and
connection reuse after a broken exchange.

Most tests share one edge (module scope) in front of `tests/raw_upstream.py`
processes whose every byte is under test control; a few need their own config.
Memory is measured on the edge *worker* process: its peak RSS (VmHWM) is reset
through /proc/<pid>/clear_refs just before the transfer and read just after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    TESTS,
    Closed,
    RawResponse,
    app_entry,
    assert_edge_error,
    close,
    connect,
    eventually,
    exchange,
    free_port,
    metric_sum,
    read_for,
    read_response,
    request_bytes,
    send,
)
from raw_upstream import eof_body
from stack import http_get, stop_process

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB
RAW_UPSTREAM = TESTS / "raw_upstream.py"
ADMIN_TOKEN = f"edge-cases-{uuid.uuid4().hex}"
MEMORY_BOUND = 16 * MiB
START_TIMEOUT = 15.0


# --------------------------------------------------------------------------- raw upstreams


@dataclass
class Raw:
    """A running tests/raw_upstream.py."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, method: str, path: str) -> bytes:
        req = urllib.request.Request(f"http://{self.address}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read()

    def stats(self) -> dict[str, Any]:
        return json.loads(self._call("GET", "/__stats"))

    def log(self) -> list[dict[str, Any]]:
        return self.stats()["log"]

    def state(self, key: str) -> str | None:
        return self.stats()["states"].get(key)

    def reset(self) -> None:
        self._call("POST", "/__reset")


def _spawn_raw(name: str, log_dir: Path, *extra: str) -> Raw:
    port = free_port()
    log_path = log_dir / f"raw-{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(RAW_UPSTREAM), "--port", str(port), "--name", name, *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=TESTS,
        )
    return Raw(name, port, proc, log_path)


def _wait_listening(server: Raw) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while b"listening" not in server.log_path.read_bytes():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"raw upstream {server.name} did not start:\n{server.log_path.read_text()}"
            )
        time.sleep(0.05)


# Upstreams of their own for tests that may leave a pooled connection poisoned, so a
# failure there cannot leak into the other tests.
ISOLATED = ("smuggle", "poison", "ghost", "unasked101")


@pytest.fixture(scope="module")
def raw_servers(tmp_path_factory) -> Iterator[dict[str, Raw]]:
    """r: general; flaky: closes on the 2nd request of each connection; paused and q:
    the in-flight leak test; ISOLATED: one per pool-poisoning test."""
    log_dir = tmp_path_factory.mktemp("raw")
    servers: dict[str, Raw] = {}
    try:
        servers["r"] = _spawn_raw("r", log_dir)
        servers["flaky"] = _spawn_raw("flaky", log_dir, "--close-on-request", "2")
        servers["paused"] = _spawn_raw("paused", log_dir, "--paused")
        for name in ("q", *ISOLATED):
            servers[name] = _spawn_raw(name, log_dir)
        for server in servers.values():
            _wait_listening(server)
        yield servers
    finally:
        for server in servers.values():
            stop_process(server.proc, group=False)


@pytest.fixture
def raw(raw_servers) -> Raw:
    raw_servers["r"].reset()
    return raw_servers["r"]


def fill_accept_queue(port: int, limit: int = 8) -> tuple[list[socket.socket], bool]:
    """Connect until a connect stays pending (accept queue full, SYNs dropped).

    Returns the sockets (keep them open: they hold the queue full) and whether a
    pending connect was actually observed.
    """
    held: list[socket.socket] = []
    for _ in range(limit):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        held.append(sock)
        _, writable, _ = select.select([], [sock], [], 0.3)
        if not writable:
            return held, True
    return held, False


@dataclass
class Blackhole:
    port: int
    hangs: bool
    sockets: list[socket.socket]


@pytest.fixture(scope="module")
def blackhole() -> Iterator[Blackhole]:
    """A listening socket (backlog 0) that never accepts, its queue already full."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held, hangs = fill_accept_queue(port)
    try:
        yield Blackhole(port, hangs, held)
    finally:
        for sock in [*held, listener]:
            sock.close()


# --------------------------------------------------------------------------- the shared edge


@pytest.fixture(scope="module")
def proxy(module_edge_launcher, upstream_server, raw_servers, blackhole):
    servers = raw_servers
    return module_edge_launcher(
        apps=[
            app_entry("echo", ["app.localhost"], upstream_server),
            app_entry("raw", ["raw.localhost"], servers["r"]),
            app_entry("flaky", ["flaky.localhost"], servers["flaky"]),
            app_entry("hole", ["hole.localhost"], f"127.0.0.1:{blackhole.port}"),
            app_entry("leak-one", ["leak-one.localhost"], servers["paused"]),
            app_entry("leak-two", ["leak-two.localhost"], servers["paused"], servers["q"]),
            *(app_entry(name, [f"{name}.localhost"], servers[name]) for name in ISOLATED),
        ],
        edge={"admin_token": ADMIN_TOKEN},
        limits={"max_body": "1GiB"},
        upstream={
            "connect_timeout": "500ms",
            "response_header_timeout": "5s",
            "idle_timeout": "30s",
        },
    )


def raw_request(method: str, target: str, host: str = "raw.localhost", **kwargs) -> bytes:
    return request_bytes(method, target, host=host, **kwargs)


async def roundtrip(port: int, data: bytes, method: str = "GET") -> RawResponse:
    resp = await exchange(port, data, method=method)
    assert resp is not None, "the edge closed the connection without a response"
    return resp


def parse_chunked(data: bytes) -> tuple[bytes, bytes]:
    """(body, trailer section) of a chunked body."""
    body = []
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(body), data
        body.append(data[:size])
        data = data[size + 2 :]


# --------------------------------------------------------------------------- worker memory


def worker_pids(supervisor_pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{supervisor_pid}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def the_worker(edge) -> int:
    pids = worker_pids(edge.proc.pid)
    assert len(pids) == 1, f"expected one edge worker under {edge.proc.pid}, found {pids}"
    return pids[0]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmHWM for {pid}")


def reset_peak_rss(pid: int) -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs '5'); the new baseline."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS of the worker via /proc/{pid}/clear_refs: {exc}")
    return peak_rss(pid)


def blocking_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, bytes already read past it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"closed before the response head: {data[:300]!r}"
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


def download(port: int, target: str, pause_after: int = 0, pause: float = 0.0) -> int:
    """GET through the edge, discard the body; bytes received. Optionally pause mid-body."""
    sock = blocking_connect(port)
    try:
        sock.sendall(raw_request("GET", target))
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        expected = content_length(head)
        received = len(rest)
        buf = bytearray(MiB)
        view = memoryview(buf)
        paused = not pause_after
        while received < expected:
            n = sock.recv_into(view)
            assert n, f"closed after {received} of {expected} bytes"
            received += n
            if not paused and received >= pause_after:
                paused = True
                time.sleep(pause)
        return received
    finally:
        sock.close()


# =========================================================================== Part 1


# --- a. connect timeout ---------------------------------------------------------------


async def test_upstream_connect_timeout_504(proxy, blackhole) -> None:
    if not blackhole.hangs:
        pytest.skip(
            "connects to a full backlog-0 listener complete here instead of hanging, "
            "so a connect timeout cannot be provoked on loopback"
        )
    resp = await exchange(proxy.port, raw_request("GET", "/echo", host="hole.localhost"))
    assert_edge_error(resp, 504)
    assert resp.header("x-edge-error") == "connect_timeout"


# --- b. stale pooled connection -----------------------------------------------------


async def test_stale_pooled_connection_retried_for_get_not_for_post(proxy, raw_servers) -> None:
    flaky = raw_servers["flaky"]
    flaky.reset()
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, raw_request("GET", "/echo?n=1", host="flaky.localhost"))
        first = await read_response(reader)
        assert first.status == 200
        # The pooled connection is closed by the upstream when this request arrives.
        await send(writer, raw_request("GET", "/echo?n=2", host="flaky.localhost"))
        second = await read_response(reader)
        assert second.status == 200, second.body
        assert json.loads(second.body)["path"] == "/echo?n=2"
        # Same situation with a body: not replayable, so the client gets the failure.
        body = b"not idempotent"
        await send(writer, raw_request("POST", "/echo?n=3", host="flaky.localhost", body=body))
        third = await read_response(reader)
        assert_edge_error(third, 502)
    finally:
        await close(writer)
    seen = [(e["method"], e["path"], e["seq"]) for e in flaky.log()]
    assert seen == [
        ("GET", "/echo?n=1", 1),
        ("GET", "/echo?n=2", 2),  # on the stale connection: closed unanswered
        ("GET", "/echo?n=2", 1),  # the retry, on a fresh connection
        ("POST", "/echo?n=3", 2),  # closed unanswered; never retried
    ], seen
    conns = [e["conn"] for e in flaky.log()]
    assert conns[0] == conns[1] and conns[2] == conns[3] and conns[1] != conns[2], conns


# --- c. trailers ----------------------------------------------------------------------


async def test_response_trailers_dropped(proxy, raw) -> None:
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, raw_request("GET", "/trailers", headers=[("Connection", "close")]))
        data, eof = await read_for(reader, 10.0)
    finally:
        await close(writer)
    assert eof, "the edge did not close after Connection: close"
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower(), head
    body, trailer = parse_chunked(rest)
    assert body == b"hello, trailers"
    assert b"x-trailer" not in data.lower(), data  # neither the Trailer field nor the trailer
    assert trailer == b"\r\n", trailer


async def test_request_trailers_not_forwarded(proxy, raw) -> None:
    chunks = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Req-Trailer: secret\r\n\r\n"
    request = raw_request(
        "POST", "/echo?trailers", headers=[("Transfer-Encoding", "chunked")], body=chunks
    )
    resp = await roundtrip(proxy.port, request)
    assert resp.status == 200
    [entry] = raw.log()
    assert entry["body_len"] == len(b"hello world")
    assert entry["trailers"] == [], entry["trailers"]
    assert "x-req-trailer" not in {k.lower() for k, _ in entry["headers"]}


# --- d. memory bounds -------------------------------------------------------------------


def test_1gib_download_memory_bound(proxy, raw) -> None:
    pid = the_worker(proxy)
    assert download(proxy.port, "/zeros?n=10000000&id=warm") == 10_000_000
    base = reset_peak_rss(pid)
    assert download(proxy.port, f"/zeros?n={GiB}&id=big") == GiB
    growth = peak_rss(pid) - base
    assert growth < MEMORY_BOUND, f"worker peak RSS grew {growth / MiB:.1f} MiB for 1 GiB"
    assert raw.state("big") == "finished"


def test_slow_reader_memory_bound(proxy, raw) -> None:
    pid = the_worker(proxy)
    assert download(proxy.port, "/zeros?n=10000000&id=warm") == 10_000_000
    base = reset_peak_rss(pid)
    total = 200 * 1000 * 1000
    got = download(proxy.port, f"/zeros?n={total}&id=slow", pause_after=50_000_000, pause=1.0)
    assert got == total
    growth = peak_rss(pid) - base
    assert growth < MEMORY_BOUND, f"worker peak RSS grew {growth / MiB:.1f} MiB (slow reader)"


def test_upload_to_slow_upstream_memory_bound(proxy, raw) -> None:
    pid = the_worker(proxy)
    assert download(proxy.port, "/zeros?n=10000000&id=warm") == 10_000_000
    base = reset_peak_rss(pid)
    total = 200 * 1000 * 1000
    head = raw_request(
        "POST",
        "/slowread?chunk=262144&delay=0.002",
        headers=[("Content-Length", str(total))],
    )
    sock = blocking_connect(proxy.port)
    try:
        sock.sendall(head)
        zeros = memoryview(bytes(MiB))
        left = total
        while left:
            part = zeros[: min(left, MiB)]
            sock.sendall(part)
            left -= len(part)
        resp_head, rest = read_head(sock)
        assert resp_head.startswith(b"HTTP/1.1 200"), resp_head
        length = content_length(resp_head)
        while len(rest) < length:
            part = sock.recv(65536)
            assert part
            rest += part
    finally:
        sock.close()
    assert json.loads(rest)["body_len"] == total
    growth = peak_rss(pid) - base
    assert growth < MEMORY_BOUND, f"worker peak RSS grew {growth / MiB:.1f} MiB (upload)"


# --- e. admin endpoints -----------------------------------------------------------------


def test_health_and_ready_public_metrics_need_token(proxy) -> None:
    assert http_get(proxy.admin_url + "/healthz")[0] == 200
    assert http_get(proxy.admin_url + "/readyz")[0] == 200
    assert http_get(proxy.admin_url + "/metrics")[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    assert http_get(proxy.admin_url + "/metrics", headers=wrong)[0] == 401
    good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    status, body = http_get(proxy.admin_url + "/metrics", headers=good)
    assert status == 200 and b"edge_requests" in body


# --- f. HTTP/1.0 ------------------------------------------------------------------------


async def test_http10_client_gets_close_by_default(proxy, raw) -> None:
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, b"GET /echo?v10 HTTP/1.0\r\nHost: raw.localhost\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status == 200
        assert json.loads(resp.body)["path"] == "/echo?v10"
        assert (resp.header("connection") or "").lower() == "close", resp.headers
        rest, eof = await read_for(reader, 5.0)
        assert eof and rest == b"", "an HTTP/1.0 connection without keep-alive stayed open"
    finally:
        await close(writer)


async def test_http10_client_keep_alive(proxy, raw) -> None:
    reader, writer = await connect(proxy.port)
    try:
        for i in range(3):
            await send(
                writer,
                f"GET /echo?ka={i} HTTP/1.0\r\nHost: raw.localhost\r\n"
                "Connection: keep-alive\r\n\r\n".encode(),
            )
            resp = await read_response(reader)
            assert resp.status == 200
            assert json.loads(resp.body)["path"] == f"/echo?ka={i}"
            assert (resp.header("connection") or "").lower() == "keep-alive", resp.headers
            assert resp.header("content-length") is not None
    finally:
        await close(writer)
    assert [e["path"] for e in raw.log()] == ["/echo?ka=0", "/echo?ka=1", "/echo?ka=2"]


async def test_close_delimited_response_to_http11_client_is_rechunked(proxy, raw) -> None:
    """Upstream body ends by closing; an HTTP/1.1 client needs it chunked, and complete.

    The upstream's close is the normal end of a close-delimited body for an HTTP/1.1
    client too, not a reset mid-response: the client gets every byte, chunked, and the
    last chunk. (httptools never reports the end of a close-delimited body: it has no
    feed_eof, so the edge has to take the close as the end.)
    """
    n = 300_000
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, raw_request("GET", f"/eof?n={n}"))
        try:
            resp = await read_response(reader)
        except Closed as exc:
            pytest.fail(f"close-delimited body cut short for an HTTP/1.1 client: {exc}")
    finally:
        await close(writer)
    assert resp.status == 200
    assert "chunked" in (resp.header("transfer-encoding") or "").lower(), resp.headers
    assert resp.body == eof_body(n)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_close_delimited_response_ending_in_a_reset_is_cut_short(
    proxy, raw, version: str
) -> None:
    """A close-delimited body that ends in a reset (not a clean close) was truncated: the
    client's connection is aborted, so it never sees a complete response (HTTP/1.1: no
    last chunk; HTTP/1.0: a reset, not a clean end)."""
    n = 300_000
    reader, writer = await connect(proxy.port)
    try:
        await send(
            writer, f"GET /eofreset?n={n} HTTP/{version}\r\nHost: raw.localhost\r\n\r\n".encode()
        )
        if version == "1.1":
            with pytest.raises(Closed):
                resp = await read_response(reader)
                pytest.fail(f"a truncated body was delivered as complete: {len(resp.body)} bytes")
        else:
            with pytest.raises(ConnectionResetError):
                while await asyncio.wait_for(reader.read(MiB), 10):
                    pass
    finally:
        await close(writer)


async def test_close_delimited_response_to_http10_client(proxy, raw) -> None:
    n = 300_000
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, f"GET /eof?n={n} HTTP/1.0\r\nHost: raw.localhost\r\n\r\n".encode())
        data, eof = await read_for(reader, 10.0)
    finally:
        await close(writer)
    assert eof
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    lower = head.lower()
    assert b"content-length" not in lower and b"transfer-encoding" not in lower, head
    assert body == eof_body(n)


# --- g. Expect -------------------------------------------------------------------------


async def test_expect_100_continue(proxy, raw) -> None:
    body = b"the body after 100"
    head = raw_request(
        "POST",
        "/echo?expect",
        headers=[("Content-Length", str(len(body))), ("Expect", "100-continue")],
    )
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        await send(writer, body)
        resp = await read_response(reader)
    finally:
        await close(writer)
    assert resp.status == 200
    [entry] = raw.log()
    assert entry["body_len"] == len(body)
    assert "expect" not in {k.lower() for k, _ in entry["headers"]}


async def test_unknown_expectation_417(proxy, raw) -> None:
    request = raw_request(
        "POST", "/echo", headers=[("Expect", "something-else"), ("Content-Length", "3")]
    )
    resp = await exchange(proxy.port, request + b"abc")
    assert_edge_error(resp, 417)
    assert raw.log() == []


# --- h. pipelining ------------------------------------------------------------------------


async def test_pipelined_unknown_host_answered_after_first(proxy, raw) -> None:
    reader, writer = await connect(proxy.port)
    try:
        await send(
            writer,
            raw_request("GET", "/slow?delay=0.3&tag=first")
            + raw_request("GET", "/echo?tag=second", host="nope.localhost"),
        )
        first = await read_response(reader)
        assert first.status == 200
        assert json.loads(first.body)["path"] == "/slow?delay=0.3&tag=first"
        second = await read_response(reader)
        assert_edge_error(second, 404)
    finally:
        await close(writer)
    assert [e["path"] for e in raw.log()] == ["/slow?delay=0.3&tag=first"]


async def test_pipelined_malformed_request_answered_after_first(proxy, raw) -> None:
    """A malformed request pipelined behind a good one: the good one's response first.

    The parse error comes before the bad request's head is complete, while the first
    request is still in flight: the client gets the first request's 200, then the 400
    for the malformed one, never the 400 in place of the 200.
    """
    reader, writer = await connect(proxy.port)
    try:
        await send(
            writer,
            raw_request("GET", "/slow?delay=0.3&tag=first") + b"THIS IS NOT HTTP\r\n\r\n",
        )
        first = await read_response(reader)
        assert first.status == 200, f"first response was {first.status} {first.body!r}"
        assert json.loads(first.body)["path"] == "/slow?delay=0.3&tag=first"
        try:
            second = await read_response(reader)
        except Closed:
            second = None
        assert_edge_error(second, 400)
    finally:
        await close(writer)


async def test_pipelined_expect_continue_not_sent_before_earlier_response(proxy, raw) -> None:
    """'100 Continue' for a pipelined request must not precede the response ahead of it.

    The second request's head (with Expect: 100-continue) is parsed while the first is
    in flight; the first status line on the wire is the first request's 200, not the
    interim 100 written before (or into the middle of) it.
    """
    body = b"12345"
    reader, writer = await connect(proxy.port)
    try:
        await send(
            writer,
            raw_request("GET", "/slow?delay=0.3&tag=first")
            + raw_request(
                "POST",
                "/echo?tag=second",
                headers=[("Content-Length", str(len(body))), ("Expect", "100-continue")],
            ),
        )
        status_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        assert status_line.startswith(b"HTTP/1.1 200"), (
            f"first thing on the wire is {status_line!r}, not the first request's response"
        )
        await send(writer, body)
    finally:
        await close(writer)


async def test_pipelined_head_then_get(proxy, raw) -> None:
    reader, writer = await connect(proxy.port)
    try:
        await send(
            writer,
            raw_request("HEAD", "/zeros?n=5000&id=h")
            + raw_request("HEAD", "/trailers")
            + raw_request("GET", "/echo?after-head"),
        )
        head1 = await read_response(reader, method="HEAD")
        assert head1.status == 200 and head1.header("content-length") == "5000"
        head2 = await read_response(reader, method="HEAD")
        assert head2.status == 200
        after = await read_response(reader)
        assert after.status == 200
        assert json.loads(after.body)["path"] == "/echo?after-head"
    finally:
        await close(writer)


# --- i. Transfer-Encoding other than chunked -------------------------------------------------


@pytest.mark.parametrize(
    "te_headers",
    [
        [("Transfer-Encoding", "gzip, chunked")],
        # Every Transfer-Encoding field counts: 'gzip' in an earlier field is not dropped
        # in favour of the last one, so the request is not forwarded as plain chunked.
        [("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
    ],
    ids=["one-field", "two-fields"],
)
async def test_transfer_coding_other_than_chunked_501(proxy, raw, te_headers) -> None:
    request = raw_request("POST", "/echo?te", headers=te_headers, body=b"3\r\nabc\r\n0\r\n\r\n")
    resp = await exchange(proxy.port, request)
    assert_edge_error(resp, 501)
    await asyncio.sleep(0.2)
    assert raw.log() == [], raw.log()


# --- j. client disconnect mid-body ----------------------------------------------------------


async def test_client_disconnect_mid_body_closes_upstream(proxy, raw) -> None:
    key = uuid.uuid4().hex
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, raw_request("GET", f"/zeros?n={GiB}&id={key}"))
        got = 0
        while got < 5 * MiB:
            part = await asyncio.wait_for(reader.read(MiB), 10)
            assert part, "closed early"
            got += len(part)
    finally:
        await close(writer)
    await eventually(
        lambda: raw.state(key) == "peer_closed",
        timeout=10,
        what="the upstream to see its connection closed",
    )
    resp = await roundtrip(proxy.port, raw_request("GET", "/echo?still-serving"))
    assert resp.status == 200
    assert json.loads(resp.body)["path"] == "/echo?still-serving"


# --- k. tunnels -----------------------------------------------------------------------------


async def test_tunnel_client_close_reaches_upstream(proxy, raw) -> None:
    key = uuid.uuid4().hex
    reader, writer = await connect(proxy.port)
    try:
        await send(
            writer,
            raw_request(
                "GET",
                f"/tunnel?id={key}",
                headers=[("Connection", "Upgrade"), ("Upgrade", "raw-echo")],
            ),
        )
        resp = await read_response(reader)
        assert resp.status == 101
        await send(writer, b"ping over the tunnel")
        echoed = await asyncio.wait_for(reader.readexactly(20), 10)
        assert echoed == b"ping over the tunnel"
        assert raw.state(key) == "open"
    finally:
        await close(writer)
    await eventually(
        lambda: raw.state(key) == "eof", timeout=10, what="the upstream to see the tunnel's EOF"
    )


async def test_websocket_large_frames(proxy, upstream) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.ws_connect(
            proxy.url + "/ws", headers={"Host": "app.localhost"}, max_msg_size=8 * MiB
        ) as ws,
    ):
        for i in range(3):
            blob = os.urandom(MiB)
            await ws.send_bytes(blob)
            assert await asyncio.wait_for(ws.receive_bytes(), 10) == blob, i
        text = "é" * (MiB // 2)
        await ws.send_str(text)
        assert await asyncio.wait_for(ws.receive_str(), 10) == text


# ========================================== Part 2: smuggling, pool poisoning, bounds, accounting


async def test_early_bytes_after_upgrade_request_not_smuggled(proxy, raw_servers) -> None:
    """Bytes after an Upgrade request must not reach the upstream before it says 101.

    The client sends a second request (with a spoofed X-Forwarded-For) right behind
    the Upgrade request's head, and the upstream answers 200 without switching. Every
    request the upstream sees went through the edge's routing and header rewriting:
    an X-Request-Id, and X-Forwarded-For set by the edge.
    """
    upstream = raw_servers["smuggle"]
    smuggled = (
        b"GET /echo?tag=smuggled HTTP/1.1\r\nHost: smuggle.localhost\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    request = raw_request(
        "GET",
        "/echo?tag=upgrade",
        host="smuggle.localhost",
        headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")],
    )
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request + smuggled)
        resp = await read_response(reader)
        assert resp.status == 200
        await read_for(reader, 0.5)
    finally:
        await close(writer)
    for entry in upstream.log():
        headers = {k.lower(): v for k, v in entry["headers"]}
        assert "x-request-id" in headers and headers.get("x-forwarded-for") == "127.0.0.1", (
            f"{entry['path']} reached the upstream without the edge's rewriting: {headers}"
        )


async def test_failed_upgrade_connection_not_reused_for_another_client(proxy, raw_servers) -> None:
    """After an upgrade the upstream refused, its connection must not serve another client.

    The client sends a slow request right behind its Upgrade request, and the
    upstream answers the upgrade with 200. The next client of that upstream gets the
    response to its own request, not the slow request's (no response queue poisoning).
    """
    host = "poison.localhost"
    smuggled = b"GET /slow?delay=0.6&tag=smuggled HTTP/1.1\r\nHost: poison.localhost\r\n\r\n"
    request = raw_request(
        "GET",
        "/echo?tag=upgrade",
        host=host,
        headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")],
    )
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request + smuggled)
        resp = await read_response(reader)
        assert resp.status == 200
    finally:
        await close(writer)
    victim = await exchange(
        proxy.port, raw_request("GET", "/echo?tag=victim", host=host), timeout=8
    )
    assert victim is not None and victim.status == 200, victim
    assert json.loads(victim.body)["path"] == "/echo?tag=victim", (
        f"another client's response was delivered: {victim.body[:200]!r}"
    )


async def test_bytes_after_response_end_poison_no_pooled_connection(proxy, raw_servers) -> None:
    """Bytes beyond a response's end, in the same read, must make the connection unusable.

    /ghost writes a complete response and, in the same write, the head of a response
    nobody asked for. The next client of that upstream gets its own response, parsed
    and re-framed by the edge (the upstream's hop-by-hop Keep-Alive field does not
    leak), not raw body bytes of the phantom response. (Bytes arriving in a later
    read, on an idle pooled connection, make the pool drop that connection.)
    """
    host = "ghost.localhost"
    ghost = await roundtrip(proxy.port, raw_request("GET", "/ghost", host=host))
    assert ghost.status == 200
    assert json.loads(ghost.body)["path"] == "/ghost"
    victim = await exchange(
        proxy.port, raw_request("GET", "/echo?tag=after-ghost", host=host), timeout=8
    )
    assert victim is not None and victim.status == 200, victim
    assert not victim.has_header("keep-alive"), (
        f"the client got the upstream's bytes without the edge's framing: {victim.headers}"
    )
    assert json.loads(victim.body)["path"] == "/echo?tag=after-ghost"


async def test_101_to_a_request_that_did_not_ask_is_not_a_tunnel(proxy, raw_servers) -> None:
    """An upstream switching protocols unasked must not turn the client connection into a tunnel.

    The request has no Upgrade header and the upstream answers 101 anyway: the client
    gets a 502, not a '101' head followed by a raw tunnel to the upstream.
    """
    key = uuid.uuid4().hex
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, raw_request("GET", f"/tunnel?id={key}", host="unasked101.localhost"))
        try:
            resp = await read_response(reader)
        except Closed:
            resp = None
        assert resp is not None and resp.status == 502, (
            f"expected 502 for an unrequested 101, got {resp and (resp.status, resp.headers)}"
        )
    finally:
        await close(writer)


async def test_options_asterisk_without_host_is_400(proxy, raw) -> None:
    """`OPTIONS *` with no Host header is answered 400 by the edge and reaches no
    upstream; the connection is not dropped without an answer."""
    resp = await exchange(proxy.port, b"OPTIONS * HTTP/1.1\r\n\r\n")
    assert_edge_error(resp, 400)
    assert raw.log() == []


async def test_oversized_head_counted_once(proxy, raw) -> None:
    """One rejected request, one count in edge_requests.

    A head of ~43 KB in one write is rejected with 431, and edge_requests_total for
    431 grows by exactly one: the rejection is not recorded a second time by the
    head-size check.
    """

    def count() -> float:
        return metric_sum(proxy.metrics(), "edge_requests_total", status="431")

    before = count()
    headers = [(f"X-Filler-{i:02d}", "f" * 700) for i in range(60)]  # ~43 KB in one write
    resp = await exchange(proxy.port, raw_request("GET", "/echo?big", headers=headers))
    assert_edge_error(resp, 431)
    await asyncio.sleep(0.1)
    assert count() - before == 1


def test_request_trailer_section_is_bounded(proxy, raw) -> None:
    """Trailer fields of a chunked request must be size-limited like header fields.

    A client sends a 24 MiB trailer field value; the worker's peak RSS grows by less
    than MEMORY_BOUND, so trailer bytes are counted against the head limit and not
    buffered without bound.
    """
    pid = the_worker(proxy)
    assert download(proxy.port, "/zeros?n=1000000&id=warm") == 1_000_000
    base = reset_peak_rss(pid)
    head = raw_request("POST", "/echo?trailer-bomb", headers=[("Transfer-Encoding", "chunked")])
    sock = blocking_connect(proxy.port)
    try:
        with contextlib.suppress(OSError):
            sock.sendall(head + b"3\r\nabc\r\n0\r\nX-Bomb: ")
            block = b"a" * MiB
            for _ in range(24):
                sock.sendall(block)
            sock.sendall(b"\r\n\r\n")
        with contextlib.suppress(OSError):
            sock.recv(65536)
    finally:
        sock.close()
    growth = peak_rss(pid) - base
    assert growth < MEMORY_BOUND, f"worker peak RSS grew {growth / MiB:.1f} MiB on one trailer"


async def test_client_abort_during_connect_releases_in_flight(proxy, raw_servers) -> None:
    """A client that resets while its upstream connect is pending must not leak `in_flight`.

    A leaked in-flight count would skew the least-in-flight choice of peer forever.
    Peer P's accept queue is full, so connects to it hang; five clients reset
    while waiting. P then starts accepting, and four concurrent requests to an app
    on [P, Q] should split 2/2 (least in flight); with the leak all go to Q.
    """
    paused, q = raw_servers["paused"], raw_servers["q"]
    held, hangs = fill_accept_queue(paused.port)
    try:
        if not hangs:
            pytest.skip("connects to a full backlog-0 listener do not hang here")
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(raw_request("GET", "/echo?abort", host="leak-one.localhost"))
            await asyncio.sleep(0.15)  # the edge is now waiting on the connect
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
        await asyncio.sleep(0.8)  # every pending connect has hit connect_timeout (500 ms)
        os.kill(paused.proc.pid, signal.SIGUSR1)
        await eventually(
            lambda: http_get(f"http://{paused.address}/__stats")[0] == 200,
            what="the paused upstream to accept",
        )
    finally:
        for sock in held:
            sock.close()
    paused.reset()
    q.reset()

    async def one(i: int) -> str:
        resp = await roundtrip(
            proxy.port, raw_request("GET", f"/slow?delay=0.6&i={i}", host="leak-two.localhost")
        )
        assert resp.status == 200, resp.body
        return json.loads(resp.body)["server"]

    servers = Counter(await asyncio.gather(*(one(i) for i in range(4))))
    assert servers == {"paused": 2, "q": 2}, f"least-in-flight split was {dict(servers)}"


# --------------------------------------------------------------------------- own-config edges


@pytest.fixture
def short_edge(start_edge, raw):
    """An edge with a 1 s upstream idle timeout and a 1 s header deadline."""
    return start_edge(
        apps=[app_entry("raw", ["raw.localhost"], raw)],
        upstream={"idle_timeout": "1s", "response_header_timeout": "2s"},
        limits={"header_timeout": "1s", "keepalive_timeout": "30s"},
    )


async def test_steady_response_body_outlives_idle_timeout(short_edge, raw) -> None:
    """A body that keeps flowing (1 KB every 0.25 s for 3 s) is not idle.

    The upstream idle_timeout (1 s) bounds the silence in a response body, not the
    whole body: every body chunk pushes the deadline forward, and the 3 s download
    arrives complete.
    """
    reader, writer = await connect(short_edge.port)
    try:
        await send(writer, raw_request("GET", "/drip?n=12&size=1000&interval=0.25"))
        try:
            resp = await read_response(reader)
        except Closed as exc:
            pytest.fail(f"a steadily flowing 3 s response was aborted (idle_timeout 1s): {exc}")
    finally:
        await close(writer)
    assert resp.status == 200
    assert resp.body == b"d" * 12_000


async def test_pipelined_partial_head_gets_header_deadline(short_edge, raw) -> None:
    """A partial request head pipelined behind a complete request must meet header_timeout.

    The head begins while the first exchange is in flight; once that one is answered
    the connection is closed (or answered 408) within the 1 s header_timeout, not
    kept for the 30 s keepalive_timeout.
    """
    reader, writer = await connect(short_edge.port)
    try:
        await send(writer, raw_request("GET", "/echo?one") + b"GET /echo?two HTTP/1.1\r\nHost: raw")
        first = await read_response(reader)
        assert first.status == 200
        data, eof = await read_for(reader, 3.5)
    finally:
        await close(writer)
    assert eof or data.startswith(b"HTTP/1.1 408"), (
        "a partial pipelined head was kept open 3.5 s with a 1 s header_timeout"
    )


# --- a client that closes mid-body --------------------------------------------------------


def upstream_conn_of(raw: Raw, path: str) -> dict[str, Any] | None:
    """The raw upstream's record of the connection that carried `path`."""
    stats = raw.stats()
    for entry in stats["log"]:
        if entry["path"] == path:
            return stats["conns"].get(str(entry["conn"]))
    return None


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100"])
@pytest.mark.parametrize("how", ["half-close", "close"])
async def test_client_closing_mid_body_aborts_the_upstream_exchange(
    proxy, raw, expect: bool, how: str
) -> None:
    """A client that closes (or half-closes) while its body is incomplete can never finish
    the request: the edge drops the upstream exchange and the client connection at once,
    not at the upstream idle timeout (30 s here)."""
    path = f"/echo?mid-body={uuid.uuid4().hex}"
    headers = [("Content-Length", "100000")]
    if expect:
        headers.append(("Expect", "100-continue"))
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, raw_request("POST", path, headers=headers))
        if expect:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim.startswith(b"HTTP/1.1 100"), interim
        await send(writer, b"z" * 1000)
        await eventually(
            lambda: upstream_conn_of(raw, path) is not None, what="the request upstream"
        )
        if how == "half-close":
            writer.write_eof()
            data, eof = await read_for(reader, 5.0)
            assert eof, f"the edge kept a half-closed, never-completing request open: {data!r}"
    finally:
        await close(writer)
    await eventually(
        lambda: (upstream_conn_of(raw, path) or {}).get("error") is not None,
        timeout=5,
        what="the upstream to see its connection dropped mid-body",
    )


# --- an Upgrade request with a body ----------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (("Content-Length", "5"), b"hello"),
        (("Transfer-Encoding", "chunked"), b"5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["length", "chunked"],
)
async def test_upgrade_request_with_a_body_is_400(proxy, raw, framing, body) -> None:
    """The edge does not forward a body with an Upgrade request: it refuses it at once
    (400), never leaves the client waiting for a response-header timeout."""
    request = raw_request(
        "GET",
        "/echo?upgrade-with-body",
        headers=[("Connection", "Upgrade"), ("Upgrade", "websocket"), framing],
    )
    resp = await exchange(proxy.port, request + body, timeout=4)
    assert_edge_error(resp, 400)
    assert raw.log() == []


# --- upstream response heads are bounded ------------------------------------------------------


@pytest.mark.parametrize("size", [MiB, 100 * KiB])
async def test_oversized_upstream_response_head_is_502(proxy, raw, size: int) -> None:
    """A response head larger than [limits] max_response_head (64 KiB by default) is not
    buffered or passed on: the client gets 502, and the edge keeps serving."""
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, raw_request("GET", f"/bighead?n={size}"))
        data, _ = await read_for(reader, 5.0)
    finally:
        await close(writer)
    assert data.startswith(b"HTTP/1.1 502"), data[:200]
    assert len(data) < 4096, f"{len(data)} bytes reached the client"
    resp = await roundtrip(proxy.port, raw_request("GET", "/echo?after-big-head"))
    assert resp.status == 200
