"""Hostile and malformed input over raw sockets: a clear 4xx, and nothing smuggled upstream."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import (
    Closed,
    RawResponse,
    assert_edge_error,
    close,
    connect,
    exchange,
    read_for,
    read_response,
    request_bytes,
    send,
)

MiB = 1024 * 1024
LIMITS = {
    "max_request_line": "4KiB",
    "max_header_bytes": "16KiB",
    "max_headers": 50,
    "max_body": "1MiB",
    "header_timeout": "1s",
}


@pytest.fixture(scope="module")
def proxy(module_edge_launcher):
    """One edge for this module with small limits and a 1 s header deadline."""
    return module_edge_launcher(limits=LIMITS)


async def rejected(port: int, data: bytes, status: int) -> RawResponse:
    """Send raw bytes; expect `status` from the edge, then the connection closed."""
    reader, writer = await connect(port)
    try:
        await send(writer, data)
        try:
            resp = await read_response(reader)
        except Closed:
            resp = None
        assert_edge_error(resp, status)
        rest, _ = await read_for(reader, 2.0)
        assert b"HTTP/1." not in rest, f"a second response followed the error: {rest[:300]!r}"
    finally:
        await close(writer)
    return resp


def nothing_reached(upstream) -> None:
    log = upstream.log()
    assert log == [], f"reached the upstream: {[(e['method'], e['path']) for e in log]}"


async def ok(port: int, data: bytes) -> dict:
    resp = await exchange(port, data)
    assert resp is not None and resp.status == 200, resp
    return json.loads(resp.body)


# --------------------------------------------------------------------------- smuggling


async def test_content_length_with_transfer_encoding(proxy, upstream) -> None:
    smuggled = request_bytes("GET", "/smuggled")
    data = (
        b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\n"
        b"Content-Length: " + str(5 + len(smuggled)).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + smuggled
    )
    await rejected(proxy.port, data, 400)
    nothing_reached(upstream)


async def test_transfer_encoding_then_content_length(proxy, upstream) -> None:
    smuggled = request_bytes("GET", "/smuggled")
    data = (
        b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n"
        b"0\r\n\r\n" + smuggled
    )
    await rejected(proxy.port, data, 400)
    nothing_reached(upstream)


@pytest.mark.parametrize(
    "lengths",
    [
        [("Content-Length", "5"), ("Content-Length", "6")],
        [("Content-Length", "5, 6")],
    ],
)
async def test_two_different_content_lengths(proxy, upstream, lengths) -> None:
    data = request_bytes("POST", "/echo", headers=lengths) + b"hello!" + request_bytes("GET", "/x")
    await rejected(proxy.port, data, 400)
    nothing_reached(upstream)


@pytest.mark.parametrize("value", ["+5", "-5", "5a", "0x5", " "])
async def test_invalid_content_length(proxy, upstream, value: str) -> None:
    data = request_bytes("POST", "/echo", headers=[("Content-Length", value)]) + b"hello"
    await rejected(proxy.port, data, 400)
    nothing_reached(upstream)


@pytest.mark.parametrize(
    "header",
    [
        b"Transfer-Encoding : chunked",  # whitespace before the colon (RFC 9112 5.1)
        b" Transfer-Encoding: chunked",  # obs-fold onto the request line
        b"Transfer-Encoding: chunked, identity",
        b"Transfer-Encoding: xchunked",
    ],
)
async def test_obfuscated_transfer_encoding(proxy, upstream, header: bytes) -> None:
    data = (
        b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\n" + header + b"\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n" + request_bytes("GET", "/smuggled")
    )
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, data)
        try:
            resp = await read_response(reader)
        except Closed:
            resp = None
        assert resp is not None, "closed without a response"
        assert 400 <= resp.status < 500 or resp.status == 501, resp
        await read_for(reader, 1.0)
    finally:
        await close(writer)
    assert "/smuggled" not in upstream.paths()


# --------------------------------------------------------------------------- sizes and counts


async def test_request_line_within_limit_works(proxy, upstream) -> None:
    target = "/echo?q=" + "a" * 3000
    assert (await ok(proxy.port, request_bytes("GET", target)))["path"] == target


async def test_oversized_request_line_414(proxy, upstream) -> None:
    await rejected(proxy.port, request_bytes("GET", "/echo?q=" + "a" * 5000), 414)
    nothing_reached(upstream)


async def test_headers_within_limits_work(proxy, upstream) -> None:
    headers = [(f"X-H{i}", "v" * 200) for i in range(40)]
    data = await ok(proxy.port, request_bytes("GET", "/echo", headers=headers))
    assert sum(1 for k, _ in data["headers"] if k.lower().startswith("x-h")) == 40


@pytest.mark.parametrize(
    "headers",
    [
        [(f"X-Big{i}", "v" * 3000) for i in range(6)],  # 18 KB in total
        [("X-Huge", "v" * 20_000)],  # one header over the whole budget
    ],
    ids=["sum", "single"],
)
async def test_oversized_headers_431(proxy, upstream, headers) -> None:
    await rejected(proxy.port, request_bytes("GET", "/echo", headers=headers), 431)
    nothing_reached(upstream)


async def test_too_many_headers_431(proxy, upstream) -> None:
    headers = [(f"X-H{i}", "v") for i in range(60)]
    await rejected(proxy.port, request_bytes("GET", "/echo", headers=headers), 431)
    nothing_reached(upstream)


async def test_body_at_max_body_accepted(proxy, upstream) -> None:
    data = await ok(proxy.port, request_bytes("POST", "/echo", body=b"x" * MiB))
    assert data["body_len"] == MiB


async def test_declared_body_over_max_body_413(proxy, upstream) -> None:
    # Only the headers are sent: the edge must refuse on the declared length alone.
    data = request_bytes("POST", "/echo", headers=[("Content-Length", str(MiB + 1))])
    await rejected(proxy.port, data, 413)
    nothing_reached(upstream)


async def test_chunked_body_over_max_body_never_completes_upstream(proxy, upstream) -> None:
    chunk = b"y" * (64 * 1024)
    head = request_bytes("POST", "/echo", headers=[("Transfer-Encoding", "chunked")])
    reader, writer = await connect(proxy.port)
    status = None
    try:
        sent_all = await send(writer, head)
        for _ in range(MiB // len(chunk) + 2):  # 1 MiB + 128 KiB in total
            sent_all = sent_all and await send(writer, b"10000\r\n" + chunk + b"\r\n")
        sent_all = sent_all and await send(writer, b"0\r\n\r\n")
        try:
            status = (await read_response(reader)).status
        except (Closed, TimeoutError):
            status = None
    finally:
        await close(writer)
    assert status in (413, None), f"expected 413 or a closed connection, got {status}"
    for entry in upstream.log():
        assert not (entry["complete"] and entry["body_len"] > MiB), entry


# --------------------------------------------------------------------------- Host and targets


async def test_missing_host_400(proxy, upstream) -> None:
    await rejected(proxy.port, request_bytes("GET", "/echo", host=None), 400)
    nothing_reached(upstream)


@pytest.mark.parametrize(
    "host",
    ["", "a b", "foo@bar", "app.localhost@evil.example", "app.localhost:abc", "app.localhost/x"],
)
async def test_bad_host_400(proxy, upstream, host: str) -> None:
    await rejected(proxy.port, request_bytes("GET", "/echo", host=host), 400)
    nothing_reached(upstream)


async def test_two_host_headers_400(proxy, upstream) -> None:
    data = request_bytes("GET", "/echo", headers=[("Host", "evil.example")])
    await rejected(proxy.port, data, 400)
    nothing_reached(upstream)


@pytest.mark.parametrize("host_header", ["not-in-table.example", "app.localhost"])
async def test_absolute_form_unknown_host_400(proxy, upstream, host_header: str) -> None:
    data = request_bytes("GET", "http://not-in-table.example/echo", host=host_header)
    await rejected(proxy.port, data, 400)
    nothing_reached(upstream)


async def test_absolute_form_known_host_is_routed(proxy, upstream) -> None:
    data = await ok(proxy.port, request_bytes("GET", "http://app.localhost/echo?abs=1"))
    assert data["path"] == "/echo?abs=1"
    assert upstream.paths() == ["/echo?abs=1"]


@pytest.mark.parametrize(
    ("target", "host"),
    [("example.com:443", "example.com:443"), ("app.localhost:80", "app.localhost:80")],
)
async def test_connect_400(proxy, upstream, target: str, host: str) -> None:
    await rejected(proxy.port, request_bytes("CONNECT", target, host=host), 400)
    nothing_reached(upstream)


# --------------------------------------------------------------------------- slowloris


async def test_headers_trickled_hit_header_deadline(proxy, upstream) -> None:
    """A byte every 0.5 s never completes the headers; the 1 s deadline must end it.

    Bytes arrive faster than the deadline, so only a deadline on the whole header
    read (not a per-read idle timer) stops this client.
    """
    request = request_bytes("GET", "/echo", headers=[("X-Slow", "s" * 200)])
    reader, writer = await connect(proxy.port)
    outcome: RawResponse | None = None

    async def read() -> RawResponse | None:
        try:
            return await read_response(reader, timeout=30)
        except Closed:
            return None

    reading = asyncio.create_task(read())
    try:
        for i in range(20):  # at most ~10 s; the whole request would take ~2 min
            if reading.done() or not await send(writer, request[i : i + 1]):
                break
            await asyncio.sleep(0.5)
        # Still trickling (no pause longer than 0.5 s) when we stop to look.
        done, _ = await asyncio.wait({reading}, timeout=0.3)
        assert done, "connection still open 10 s into trickled headers (header_timeout = 1s)"
        outcome = reading.result()
    finally:
        reading.cancel()
        await close(writer)
    if outcome is not None:
        assert_edge_error(outcome, 408)
    nothing_reached(upstream)


async def test_idle_connection_without_request_is_closed(proxy, upstream) -> None:
    reader, writer = await connect(proxy.port)
    try:
        data, eof = await read_for(reader, 10.0)
    finally:
        await close(writer)
    assert eof, "an idle connection that sent nothing was kept open for 10 s"
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:200]
    nothing_reached(upstream)


# --------------------------------------------------------------------------- host injection


@pytest.mark.parametrize(
    "host",
    [
        "evil.com,x.example.localhost",
        "<script>.example.localhost",
        "x.example.localhost\tevil",
        "a_b.example.localhost",
        "-x.example.localhost",
        "x.example.localhost..",
        "x.example.localhost:99999",
        "x.example.localhost:",
    ],
)
async def test_wildcard_route_refuses_a_host_that_is_not_a_dns_name(
    proxy, upstream, host: str
) -> None:
    """A wildcard route takes only RFC 1123 names: anything else is 400, never forwarded."""
    await rejected(proxy.port, request_bytes("GET", "/echo", host=host), 400)
    nothing_reached(upstream)


async def test_forwarded_host_is_the_normalised_host(proxy, upstream) -> None:
    """Host and X-Forwarded-Host reach the app lower-cased, without the trailing dot."""
    data = await ok(proxy.port, request_bytes("GET", "/echo", host="X.Example.Localhost.:8080"))
    headers = {k.lower(): v for k, v in data["headers"]}
    assert headers["host"] == "x.example.localhost:8080"
    assert headers["x-forwarded-host"] == "x.example.localhost:8080"
