"""Forwarding through a real edge process to real upstream servers on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme
from helpers import (
    app_entry,
    assert_one_line_body,
    close,
    connect,
    eventually,
    free_port,
    header_values,
    read_response,
    request_bytes,
    send,
)
from upstream_app import pattern_sha256

HOST = {"Host": "app.localhost"}
KiB = 1024
MiB = 1024 * 1024
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "upgrade", "x-drop-me")


@pytest.fixture(scope="module")
def proxy(module_edge_launcher, upstream_server, upstream2_server):
    """One edge for this module: app 'echo' -> upstream a, 'exact' -> b, 'down' -> nothing."""
    return module_edge_launcher(
        apps=[
            app_entry("echo", ["app.localhost", "*.example.localhost"], upstream_server),
            app_entry("exact", ["exact.example.localhost"], upstream2_server),
            app_entry("down", ["down.localhost"], f"127.0.0.1:{free_port()}"),
        ],
        # Short enough for the timeout tests, long enough that a loaded 2-core box stalling
        # a 50 MB body or a header for a few seconds does not fire them.
        upstream={"connect_timeout": "2s", "response_header_timeout": "5s", "idle_timeout": "8s"},
    )


async def echo(client: aiohttp.ClientSession, url: str, **kwargs) -> dict:
    kwargs.setdefault("headers", HOST)
    async with client.request(kwargs.pop("method", "GET"), url, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


# --------------------------------------------------------------------------- methods, statuses


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_methods(proxy, upstream, client, method: str) -> None:
    body = f"payload for {method}".encode() if method in ("POST", "PUT", "PATCH") else b""
    data = await echo(client, proxy.url + "/echo/m", method=method, data=body or None)
    assert data["method"] == method
    assert data["path"] == "/echo/m"
    assert data["body_len"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert [(e["method"], e["path"]) for e in upstream.log()] == [(method, "/echo/m")]


async def test_head_returns_headers_only(proxy, upstream) -> None:
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request_bytes("HEAD", "/bytes/1000"))
        head = await read_response(reader, method="HEAD")
        assert head.status == 200
        assert head.header("content-length") == "1000"
        assert head.body == b""
        # Nothing stray followed the headers: the next response on the connection parses.
        await send(writer, request_bytes("GET", "/echo?after-head"))
        after = await read_response(reader)
        assert after.status == 200
        assert json.loads(after.body)["path"] == "/echo?after-head"
    finally:
        await close(writer)
    assert [(e["method"], e["path"]) for e in upstream.log()] == [
        ("HEAD", "/bytes/1000"),
        ("GET", "/echo?after-head"),
    ]


@pytest.mark.parametrize("code", [200, 201, 202, 301, 400, 404, 418, 500, 503])
async def test_upstream_status_and_body_pass_through(proxy, upstream, client, code: int) -> None:
    async with client.get(
        proxy.url + f"/status/{code}", headers=HOST, allow_redirects=False
    ) as resp:
        assert resp.status == code
        assert await resp.read() == f"status {code}\n".encode()


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(proxy, upstream, code: int) -> None:
    reader, writer = await connect(proxy.port)
    try:
        for _ in range(2):
            await send(writer, request_bytes("GET", f"/status/{code}"))
            resp = await read_response(reader)
            assert resp.status == code
            assert resp.body == b""
            assert not resp.has_header("transfer-encoding")
            # If the edge had sent any body bytes, this response would not parse.
            await send(writer, request_bytes("GET", f"/echo?after={code}"))
            after = await read_response(reader)
            assert after.status == 200
            assert json.loads(after.body)["path"] == f"/echo?after={code}"
    finally:
        await close(writer)


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("size", [0, 1, 64 * KiB, 1 * MiB, 50 * 1000 * 1000])
async def test_request_body_sizes(proxy, upstream, client, size: int) -> None:
    body = os.urandom(size)
    data = await echo(client, proxy.url + "/echo", method="POST", data=body)
    assert data["body_len"] == size
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 64 * KiB, 1 * MiB, 50 * 1000 * 1000])
async def test_response_body_sizes(proxy, upstream, client, size: int) -> None:
    digest = hashlib.sha256()
    received = 0
    async with client.get(proxy.url + f"/bytes/{size}", headers=HOST) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Length") == str(size)
        async for part in resp.content.iter_chunked(256 * KiB):
            digest.update(part)
            received += len(part)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)


@pytest.mark.parametrize("size", [1, 3 * MiB + 7])
async def test_chunked_request_body(proxy, upstream, client, size: int) -> None:
    body = os.urandom(size)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, size, 100_000):
            yield body[start : start + 100_000]

    data = await echo(client, proxy.url + "/echo", method="POST", data=chunks())
    assert data["body_len"] == size
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    names = {name.lower() for name, _ in data["headers"]}
    assert not {"content-length", "transfer-encoding"} <= names, data["headers"]


async def test_chunked_request_raw_with_extensions_and_trailers(proxy, upstream) -> None:
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\nX-Trailer: dropped\r\n\r\n"
    request = request_bytes("POST", "/echo", headers=[("Transfer-Encoding", "chunked")], body=body)
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request)
        resp = await read_response(reader)
    finally:
        await close(writer)
    assert resp.status == 200
    data = json.loads(resp.body)
    expected = b"hello world0123456789"
    assert data["body_len"] == len(expected)
    assert data["body_sha256"] == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 100_000, 5 * MiB + 3])
async def test_chunked_response(proxy, upstream, client, size: int) -> None:
    async with client.get(proxy.url + f"/chunked/{size}", headers=HOST) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert len(body) == size
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)


async def test_first_byte_arrives_before_upstream_finishes(proxy, upstream, client) -> None:
    key = uuid.uuid4().hex
    async with client.get(proxy.url + f"/stream?id={key}", headers=HOST) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readexactly(12), 10)
        assert first == b"first-chunk\n"
        # The upstream is still holding the rest of its response.
        assert upstream.state(key) == "waiting"
        upstream.release(key)
        rest = await asyncio.wait_for(resp.content.read(), 10)
    assert rest == b"rest-of-the-body\n"
    await eventually(lambda: upstream.state(key) == "finished", what="upstream to finish")


@pytest.mark.parametrize("endpoint", ["stream", "hold"])
async def test_client_disconnect_cancels_upstream_request(proxy, upstream, endpoint: str) -> None:
    key = uuid.uuid4().hex
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request_bytes("GET", f"/{endpoint}?id={key}"))
        await eventually(lambda: upstream.state(key) == "waiting", what="upstream to get it")
        if endpoint == "stream":
            # The response has started: wait until its first chunk reaches us.
            await asyncio.wait_for(reader.readuntil(b"first-chunk\n"), 10)
    finally:
        await close(writer)
    await eventually(
        lambda: upstream.state(key) == "cancelled",
        timeout=10,
        what="the upstream request to be cancelled after the client left",
    )


# --------------------------------------------------------------------------- headers


async def test_duplicate_request_headers_preserved(proxy, upstream, client) -> None:
    headers = [("Host", "app.localhost"), ("X-Dup", "one"), ("X-Dup", "two"), ("X-Other", "x")]
    data = await echo(client, proxy.url + "/echo", headers=headers)
    assert header_values(data["headers"], "x-dup") == ["one", "two"]
    assert header_values(data["headers"], "x-other") == ["x"]


async def test_set_cookie_and_duplicate_response_headers_preserved(proxy, upstream, client) -> None:
    async with client.get(proxy.url + "/cookies", headers=HOST) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == [
            "a=1; Path=/",
            "b=2; Path=/; HttpOnly",
            "c=3; Expires=Wed, 21 Oct 2015 07:28:00 GMT",
        ]
        assert resp.headers.getall("X-Dup") == ["one", "two"]


@pytest.mark.parametrize(
    "target",
    [
        "/echo?a=%20b&c=%2F&d=%E2%9C%93&e",
        "/echo?plus=a+b&pct=%2B&eq=a=b&amp=%26&hash=%23",
        "/echo?reserved=!$'()*,;:@/?&tilde=~",
        "/echo?empty=&=v&&x&lower=%e2%9c%93&emoji=%F0%9F%98%80",
        "/echo/a%2Fb/c%20d;p=1?q=%3F",
        "/echo/~user/_-.!$&'()*+,;=:@",
    ],
)
async def test_odd_targets_reach_upstream_byte_identical(proxy, upstream, target: str) -> None:
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request_bytes("GET", target))
        resp = await read_response(reader)
    finally:
        await close(writer)
    assert resp.status == 200, resp.body
    assert json.loads(resp.body)["path"] == target
    assert upstream.paths() == [target]


async def test_hop_by_hop_request_headers_removed(proxy, upstream) -> None:
    request = request_bytes(
        "GET",
        "/echo",
        headers=[
            ("Connection", "keep-alive, X-Drop-Me"),
            ("X-Drop-Me", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Kept", "yes"),
        ],
    )
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request)
        resp = await read_response(reader)
    finally:
        await close(writer)
    assert resp.status == 200
    headers = json.loads(resp.body)["headers"]
    for name in ("x-drop-me", "keep-alive", "te", "proxy-connection"):
        assert header_values(headers, name) == [], (name, headers)
    for value in header_values(headers, "connection"):
        assert "x-drop-me" not in value.lower()
    assert header_values(headers, "x-kept") == ["yes"]


async def test_connection_header_cannot_strip_the_edges_own_headers(proxy, upstream) -> None:
    request = request_bytes(
        "GET",
        "/echo",
        headers=[
            ("Connection", "keep-alive, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host"),
            ("X-Forwarded-For", "6.6.6.6"),
        ],
    )
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, request)
        resp = await read_response(reader)
    finally:
        await close(writer)
    headers = json.loads(resp.body)["headers"]
    assert header_values(headers, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(headers, "x-forwarded-proto") == ["http"]
    assert header_values(headers, "x-forwarded-host") == ["app.localhost"]


async def test_hop_by_hop_response_headers_removed(proxy, upstream, client) -> None:
    async with client.get(proxy.url + "/hop", headers=HOST) as resp:
        assert resp.status == 200
        assert await resp.read() == b"hop\n"
        for name in ("X-Secret", "Keep-Alive", "Proxy-Connection"):
            assert name not in resp.headers, (name, resp.headers)
        for value in resp.headers.getall("Connection", []):
            assert "x-secret" not in value.lower()
        assert resp.headers.get("X-Kept") == "yes"


async def test_forwarded_headers_set(proxy, upstream, client) -> None:
    data = await echo(client, proxy.url + "/echo")
    headers = data["headers"]
    assert header_values(headers, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(headers, "x-forwarded-proto") == ["http"]
    assert header_values(headers, "x-forwarded-host") == ["app.localhost"]


async def test_untrusted_client_forwarding_headers_replaced(proxy, upstream, client) -> None:
    headers = {
        "Host": "app.localhost",
        "X-Forwarded-For": "1.2.3.4",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=1.2.3.4;proto=https;host=evil.example",
    }
    data = await echo(client, proxy.url + "/echo", headers=headers)
    seen = data["headers"]
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["app.localhost"]
    for name, value in seen:
        assert "1.2.3.4" not in value and "evil.example" not in value, (name, value)


async def test_trusted_proxy_forwarded_for_appended(start_edge, upstream, client) -> None:
    edge = start_edge(edge={"trusted_proxies": ["127.0.0.1/32"]})
    headers = {"Host": "app.localhost", "X-Forwarded-For": "1.2.3.4, 10.0.0.1"}
    data = await echo(client, edge.url + "/echo", headers=headers)
    chain = ",".join(header_values(data["headers"], "x-forwarded-for"))
    assert [part.strip() for part in chain.split(",")] == ["1.2.3.4", "10.0.0.1", "127.0.0.1"]


CLIENT_IDENTITY = {
    "X-Real-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
    "X-Forwarded-Port": "6666",
    "X-Forwarded-Prefix": "/evil",
}


async def test_untrusted_client_identity_headers_dropped(proxy, upstream, client) -> None:
    """Client-IP and forwarding headers the edge does not set itself never reach the app
    from an untrusted peer, and its X-Request-Id is replaced by the edge's own."""
    request_id = f"req-{uuid.uuid4().hex}"
    headers = {**HOST, **CLIENT_IDENTITY, "X-Request-Id": request_id}
    data = await echo(client, proxy.url + "/echo", headers=headers)
    seen = data["headers"]
    for name in CLIENT_IDENTITY:
        assert header_values(seen, name) == [], (name, seen)
    [edge_id] = header_values(seen, "x-request-id")
    assert edge_id != request_id and edge_id.strip()


async def test_trusted_proxy_identity_headers_and_request_id_kept(
    start_edge, upstream, client
) -> None:
    edge = start_edge(edge={"trusted_proxies": ["127.0.0.1/32"]})
    request_id = f"req-{uuid.uuid4().hex}"
    headers = {**HOST, **CLIENT_IDENTITY, "X-Request-Id": request_id}
    data = await echo(client, edge.url + "/echo", headers=headers)
    seen = data["headers"]
    for name, value in CLIENT_IDENTITY.items():
        assert header_values(seen, name) == [value], (name, seen)
    assert header_values(seen, "x-request-id") == [request_id]


async def test_client_identity_headers_are_configurable(start_edge, upstream, client) -> None:
    edge = start_edge(edge={"client_identity_headers": ["X-Tenant-Ip"]})
    headers = {**HOST, "X-Tenant-Ip": "6.6.6.6", "X-Real-IP": "7.7.7.7"}
    data = await echo(client, edge.url + "/echo", headers=headers)
    assert header_values(data["headers"], "x-tenant-ip") == []
    assert header_values(data["headers"], "x-real-ip") == ["7.7.7.7"]


async def test_request_id_generated_and_unique(proxy, upstream, client) -> None:
    ids = []
    for _ in range(20):
        data = await echo(client, proxy.url + "/echo")
        values = header_values(data["headers"], "x-request-id")
        assert len(values) == 1 and values[0].strip(), data["headers"]
        ids.append(values[0])
    assert len(set(ids)) == len(ids)


# --------------------------------------------------------------------------- connections


async def test_websocket_echo(proxy, upstream, client) -> None:
    async with client.ws_connect(proxy.url + "/ws", headers=HOST) as ws:
        for text in ["hello", "x" * 100_000, "✓ unicode"]:
            await ws.send_str(text)
            assert await asyncio.wait_for(ws.receive_str(), 10) == text
        blob = os.urandom(70_000)
        await ws.send_bytes(blob)
        assert await asyncio.wait_for(ws.receive_bytes(), 10) == blob
    [entry] = [e for e in upstream.log() if e["path"] == "/ws"]
    assert [v.lower() for v in header_values(entry["headers"], "upgrade")] == ["websocket"]


async def test_keepalive_many_requests_on_one_connection(proxy, upstream) -> None:
    reader, writer = await connect(proxy.port)
    try:
        for i in range(20):
            await send(writer, request_bytes("GET", f"/echo?seq={i}"))
            resp = await read_response(reader)
            assert resp.status == 200
            assert json.loads(resp.body)["path"] == f"/echo?seq={i}"
    finally:
        await close(writer)


async def test_pipelined_requests_answered_in_order(proxy, upstream) -> None:
    reader, writer = await connect(proxy.port)
    try:
        await send(writer, b"".join(request_bytes("GET", f"/echo?pipe={i}") for i in range(5)))
        for i in range(5):
            resp = await read_response(reader)
            assert resp.status == 200
            assert json.loads(resp.body)["path"] == f"/echo?pipe={i}"
    finally:
        await close(writer)


async def test_1000_concurrent_requests_none_dropped(start_edge, upstream) -> None:
    # Its own edge with the default upstream timeouts: the module's short header timeout
    # (for the timeout tests) can fire on a loaded 2-core box and is not what this tests.
    edge = start_edge(apps=[app_entry("echo", ["app.localhost"], upstream)])
    connector = aiohttp.TCPConnector(limit=200)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> tuple[int, str]:
            async with session.get(edge.url + f"/echo?i={i}", headers=HOST) as resp:
                body = await resp.read()
                path = json.loads(body)["path"] if resp.status == 200 else body.decode()
                return resp.status, path

        results = await asyncio.gather(*(one(i) for i in range(1000)), return_exceptions=True)
    failures = [(i, r) for i, r in enumerate(results) if r != (200, f"/echo?i={i}")]
    assert failures == [], f"{len(failures)} of 1000 failed, e.g. {failures[:5]}"
    assert len(upstream.log()) == 1000


# --------------------------------------------------------------------------- routing, errors


async def test_unknown_host_404(proxy, upstream, client) -> None:
    async with client.get(proxy.url + "/echo", headers={"Host": "nope.localhost"}) as resp:
        assert resp.status == 404
        assert_one_line_body(await resp.read(), resp.headers.get("Content-Type"))
    assert upstream.log() == []


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("app.localhost", "a"),
        ("APP.Localhost:8080", "a"),
        ("x.example.localhost", "a"),
        ("a.b.example.localhost", "a"),
        ("X.EXAMPLE.localhost:1", "a"),
        ("exact.example.localhost", "b"),
        ("EXACT.Example.LOCALHOST:8080", "b"),
        ("example.localhost", None),
        ("notexample.localhost", None),
        ("x.example.localhost.evil.net", None),
    ],
)
async def test_host_routing_exact_then_wildcard(
    proxy, upstream, upstream2, client, host: str, expected: str | None
) -> None:
    async with client.get(proxy.url + "/echo", headers={"Host": host}) as resp:
        if expected is None:
            assert resp.status == 404
        else:
            assert resp.status == 200
            assert (await resp.json())["upstream"] == expected


async def test_upstream_down_502(proxy, upstream, client) -> None:
    async with client.get(proxy.url + "/echo", headers={"Host": "down.localhost"}) as resp:
        assert resp.status == 502
        assert_one_line_body(await resp.read(), resp.headers.get("Content-Type"))


async def test_slow_upstream_headers_504(proxy, upstream, client) -> None:
    # response_header_timeout is 5s for this edge; the upstream waits 10s.
    async with client.get(
        proxy.url + "/slow-headers?delay=10",
        headers=HOST,
        timeout=aiohttp.ClientTimeout(total=15),
    ) as resp:
        assert resp.status == 504
        assert_one_line_body(await resp.read(), resp.headers.get("Content-Type"))


async def test_upstream_idle_mid_body_aborts_the_response(proxy, upstream, client) -> None:
    # idle_timeout is 8s; the upstream stalls 20s after half its declared body.
    async with client.get(proxy.url + "/slow-body?delay=20", headers=HOST) as resp:
        assert resp.status == 200
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await asyncio.wait_for(resp.read(), 15)


# --------------------------------------------------------------------------- TLS


async def test_tls_listener(start_edge, upstream, tmp_path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "app.localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(key_file)
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    edge = start_edge(edge={"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}})
    assert edge.url.startswith("https://")

    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(edge.url + "/echo?tls=1", headers=HOST, ssl=context) as resp:
            assert resp.status == 200
            data = await resp.json()
        # Without trusting the CA the handshake fails: it really is our certificate.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(edge.url + "/echo", headers=HOST, ssl=ssl.create_default_context())
    assert data["path"] == "/echo?tls=1"
    assert header_values(data["headers"], "x-forwarded-proto") == ["https"]
