"""Small test helpers: a raw HTTP/1.1 client for hostile input, metrics parsing, polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from scheduler_client.config_file import render_toml as to_toml  # noqa: F401 (the tests' name)
from scheduler_client.local.loopback import free_port
from wake.store.protocol import AppWakeState

IO_TIMEOUT = 10.0
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def app_entry(name: str, hosts: list[str], *upstreams: Any) -> dict[str, Any]:
    return {
        "name": name,
        "hosts": hosts,
        "upstreams": [u if isinstance(u, str) else u.address for u in upstreams],  # Upstream
    }


class CountingForwarder:
    """A TCP forwarder to a loopback port counting the requests that start with `marker`."""

    def __init__(self, target_port: int, marker: bytes) -> None:
        self.target_port = target_port
        self.marker = marker
        self.port = free_port()
        self.count = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> CountingForwarder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, count=True), self._pipe(up_reader, writer)
            )
        finally:
            for w in (writer, up_writer):
                w.close()
            self.tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool = False
    ) -> None:
        tail = b""
        keep = len(self.marker)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while chunk := await reader.read(65536):
                if count:
                    seen = tail + chunk
                    self.count += seen.count(self.marker)
                    # A request line split over two reads is counted once.
                    tail = seen[-keep:] if self.marker not in seen[-keep:] else b""
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()


def run_edge_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    """`python -m edge ARGS...`, output captured, bounded in time."""
    full_env = {k: v for k, v in os.environ.items() if k != "EDGE_ADMIN_TOKEN"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
        check=False,
    )


class Closed(Exception):
    """The peer closed (or reset) the connection before a complete response."""


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_header(self, name: str) -> bool:
        return bool(self.header_all(name))


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise Closed(f"closed mid-line after {exc.partial!r}") from None
    except ConnectionError as exc:
        raise Closed(f"connection error: {exc!r}") from None
    return line


async def _read_response(reader: asyncio.StreamReader, method: str) -> RawResponse:
    while True:
        line = await _readline(reader)
        if not line.strip():
            continue  # tolerate a stray blank line between responses
        try:
            version, status_text, *reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            status = int(status_text)
        except ValueError:
            raise AssertionError(f"not an HTTP status line: {line!r}") from None
        headers: list[tuple[str, str]] = []
        while True:
            hline = await _readline(reader)
            if hline in (b"\r\n", b"\n"):
                break
            name, _, value = hline.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        resp = RawResponse(version, status, reason[0] if reason else "", headers)
        if 100 <= status < 200 and status != 101:
            continue  # interim response; the final one follows
        break
    if method == "HEAD" or status in (101, 204, 304):
        return resp
    te = ",".join(resp.header_all("transfer-encoding")).lower()
    try:
        if "chunked" in te:
            parts = []
            while True:
                size_line = await _readline(reader)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (await _readline(reader)) not in (b"\r\n", b"\n"):
                        pass  # trailer fields
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            resp.body = b"".join(parts)
        elif resp.has_header("content-length"):
            resp.body = await reader.readexactly(int(resp.header("content-length")))
        else:
            resp.body = await reader.read()
    except asyncio.IncompleteReadError as exc:
        raise Closed(f"closed mid-body after {len(exc.partial)} bytes") from None
    except ConnectionError as exc:
        raise Closed(f"connection error mid-body: {exc!r}") from None
    return resp


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET", timeout: float = IO_TIMEOUT
) -> RawResponse:
    """One complete response; raises Closed if the peer hangs up first."""
    return await asyncio.wait_for(_read_response(reader, method), timeout)


async def read_for(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, bool]:
    """Whatever arrives within `seconds`; (data, eof_seen)."""
    chunks = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return b"".join(chunks), False
        except ConnectionError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
    return b"".join(chunks), False


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2)


def reset(writer: asyncio.StreamWriter) -> None:
    """Go away abruptly: a TCP reset (SO_LINGER 0), not a FIN a server may take as a
    half-close that still wants its answers."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def send(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write and drain; False if the peer has already gone away."""
    try:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
    except (ConnectionError, TimeoutError):
        return False
    return True


async def exchange(
    port: int, data: bytes, method: str = "GET", timeout: float = IO_TIMEOUT
) -> RawResponse | None:
    """Send raw bytes on a fresh connection; the response, or None if closed without one."""
    reader, writer = await connect(port)
    try:
        await send(writer, data)
        try:
            return await read_response(reader, method, timeout)
        except Closed:
            return None
    finally:
        await close(writer)


def request_bytes(
    method: str,
    target: str,
    host: str | None = "app.localhost",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{k}: {v}" for k, v in headers or [])
    if body and not any(
        k.lower() in ("content-length", "transfer-encoding") for k, _ in headers or []
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_edge_error(resp: RawResponse | None, status: int) -> None:
    """An error generated by the edge: the status, and a short one-line plain body."""
    assert resp is not None, f"expected {status}, the connection closed without a response"
    assert resp.status == status, f"expected {status}, got {resp.status} {resp.body[:200]!r}"
    assert_one_line_body(resp.body, resp.header("content-type"))


def assert_one_line_body(body: bytes, content_type: str | None) -> None:
    text = body.strip()
    assert text, "edge error body is empty"
    assert b"\n" not in text, f"edge error body is not one line: {body[:300]!r}"
    assert len(text) < 512, f"edge error body is not short: {len(text)} bytes"
    if content_type is not None:
        assert content_type.startswith("text/plain"), content_type


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """All samples named `name` in a Prometheus text exposition."""
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), sample.value))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for sample_labels, value in metric_samples(text, name)
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    timeout: float = 10.0,
    interval: float = 0.1,
    what: str = "condition",
) -> None:
    """Poll `check` (sync or async) until true; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def header_values(headers: list[list[str]], name: str) -> list[str]:
    """Values of `name` in an upstream-recorded [[name, value], ...] list."""
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def cluster_node_entry(
    node_id: str, flags: str, master_id: str = "-", slots=(), connected=True
) -> dict:
    """One node of CLUSTER NODES as redis-py parses it."""
    return {
        "node_id": node_id,
        "flags": flags,
        "master_id": master_id,
        "slots": [list(r) for r in slots],
        "connected": connected,
    }


def nodes_with_a_failed_master() -> dict[str, dict]:
    """CLUSTER NODES of 3 masters (one failed, its slots lost) and 3 replicas (one failed,
    one of the failed master): 10,923 slots covered, 2 live masters, 1 live replica."""
    return {
        "127.0.0.1:1": cluster_node_entry("a", "myself,master", slots=[("0", "5460")]),
        "127.0.0.1:2": cluster_node_entry("b", "master", slots=[("5461", "10922")]),
        "127.0.0.1:3": cluster_node_entry(
            "c", "master,fail", slots=[("10923", "16383")], connected=False
        ),
        "127.0.0.1:4": cluster_node_entry("d", "slave", "a"),
        "127.0.0.1:5": cluster_node_entry("e", "slave", "c"),
        "127.0.0.1:6": cluster_node_entry("f", "slave,fail", "b"),
    }


async def made_hot_for_every_waiter(
    writer: Any, apps: list[str], waiters: list[asyncio.Task], timeout: float
) -> None:
    """Write each app hot (fenced, announced) through `writer`; every waiter then sees hot."""
    for app in apps:
        lease = await writer.acquire_lease(app, "w", 5)
        assert lease is not None
        await writer.write_state(AppWakeState(app=app, state="hot"), lease.token)
        await writer.publish(app)
    done, _ = await asyncio.wait(waiters, timeout=timeout)
    assert len(done) == len(waiters)
    assert all(w.result().state == "hot" for w in waiters)
