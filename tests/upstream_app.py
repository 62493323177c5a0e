"""A real upstream HTTP server for the edge tests (aiohttp, 127.0.0.1 only).

Run as ``python tests/upstream_app.py --port P [--name NAME]``. Everything it sees
is recorded so tests can check what actually reached the upstream:

- ``GET /log``: JSON list of requests seen since the last ``/reset`` (control
  endpoints excluded), each ``{id, method, path, version, headers, peer,
  complete, body_len}``; ``headers`` is a list of ``[name, value]`` pairs with
  duplicates and order preserved, ``path`` is the raw request target.
- ``POST /reset``: clears the log and the stream/hold states.
- ``GET /state?id=X``: the state of a ``/stream`` or ``/hold`` request:
  ``waiting``, ``finished`` or ``cancelled`` (the peer went away), or ``unknown``.
- ``POST /release?id=X``: lets a waiting ``/stream`` or ``/hold`` request go on.

Test endpoints: ``/echo`` (any method, any suffix), ``/status/{code}``,
``/bytes/{n}``, ``/chunked/{n}``, ``/stream?id=X``, ``/hold?id=X``, ``/cookies``,
``/slow-headers?delay=S``, ``/slow-body?delay=S``, ``/ws``, ``/hop``, ``/healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import Iterator

from aiohttp import WSMsgType, web

# Deterministic body content: a prime-length block, so 64 KiB chunk boundaries
# never line up with the pattern period.
PATTERN = bytes((i * 31 + 7) % 251 for i in range(65521))
_PATTERN3 = PATTERN * 3
CHUNK = 64 * 1024
WAIT_LIMIT = 30.0  # seconds any /stream or /hold waits for a release at most

CONTROL_PATHS = {"/log", "/reset", "/state", "/release", "/healthz"}


def pattern_chunks(n: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The first n bytes of the endless PATTERN repetition, in chunks."""
    offset = 0
    while offset < n:
        size = min(chunk, n - offset)
        start = offset % len(PATTERN)
        yield _PATTERN3[start : start + size]
        offset += size


def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for part in pattern_chunks(n):
        digest.update(part)
    return digest.hexdigest()


def _headers(request: web.Request) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]


@web.middleware
async def record(request: web.Request, handler):
    if request.path in CONTROL_PATHS:
        return await handler(request)
    app = request.app
    peer = request.transport.get_extra_info("peername") if request.transport else None
    entry = {
        "id": next(app["counter"]),
        "method": request.method,
        "path": request.raw_path,
        "version": f"{request.version.major}.{request.version.minor}",
        "headers": _headers(request),
        "peer": list(peer[:2]) if peer else None,
        "complete": False,
        "body_len": None,
    }
    app["log"].append(entry)
    request["entry"] = entry
    return await handler(request)


async def _read_body(request: web.Request) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    async for part in request.content.iter_chunked(CHUNK):
        digest.update(part)
        length += len(part)
    entry = request.get("entry")
    if entry is not None:
        entry["complete"] = True
        entry["body_len"] = length
    return length, digest.hexdigest()


async def echo(request: web.Request) -> web.Response:
    length, sha = await _read_body(request)
    return web.json_response(
        {
            "upstream": request.app["name"],
            "method": request.method,
            "path": request.raw_path,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": _headers(request),
            "body_len": length,
            "body_sha256": sha,
        }
    )


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    await _read_body(request)
    if code in (204, 304) or code < 200:
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}\n")


async def bytes_(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    if request.method != "HEAD":
        for part in pattern_chunks(n):
            await resp.write(part)
    await resp.write_eof()
    return resp


async def chunked(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for part in pattern_chunks(n):
        await resp.write(part)
    await resp.write_eof()
    return resp


def _event(app: web.Application, key: str) -> asyncio.Event:
    return app["release"].setdefault(key, asyncio.Event())


async def _wait_release(request: web.Request, key: str) -> bool:
    """Wait for /release?id=key; False (and state 'cancelled') if the peer left."""
    app = request.app
    event = _event(app, key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_LIMIT
    try:
        while not event.is_set() and loop.time() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                app["state"][key] = "cancelled"
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 0.05)
    except asyncio.CancelledError:
        app["state"][key] = "cancelled"
        raise
    return True


async def stream(request: web.Request) -> web.StreamResponse:
    """First chunk at once, the rest only after /release?id=X (or WAIT_LIMIT)."""
    key = request.query.get("id", "")
    app = request.app
    app["state"][key] = "waiting"
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        await resp.write(b"first-chunk\n")
        if not await _wait_release(request, key):
            return resp
        await resp.write(b"rest-of-the-body\n")
        await resp.write_eof()
    except asyncio.CancelledError:
        app["state"][key] = "cancelled"
        raise
    except (ConnectionError, RuntimeError):
        app["state"][key] = "cancelled"
        return resp
    app["state"][key] = "finished"
    return resp


async def hold(request: web.Request) -> web.Response:
    """Sends nothing until /release?id=X (or WAIT_LIMIT), then 200 'released'."""
    key = request.query.get("id", "")
    app = request.app
    app["state"][key] = "waiting"
    if not await _wait_release(request, key):
        return web.Response(text="cancelled\n")
    app["state"][key] = "finished"
    return web.Response(text="released\n")


async def cookies(request: web.Request) -> web.Response:
    resp = web.Response(text="cookies\n")
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    resp.headers.add("Set-Cookie", "c=3; Expires=Wed, 21 Oct 2015 07:28:00 GMT")
    resp.headers.add("X-Dup", "one")
    resp.headers.add("X-Dup", "two")
    return resp


async def slow_headers(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "5")))
    return web.Response(text="slow headers\n")


async def slow_body(request: web.Request) -> web.StreamResponse:
    """Content-Length 10, sends 5 bytes, stalls for `delay`, then the other 5."""
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    resp.content_length = 10
    await resp.prepare(request)
    await resp.write(b"12345")
    await asyncio.sleep(float(request.query.get("delay", "5")))
    await resp.write(b"67890")
    await resp.write_eof()
    return resp


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
        else:
            break
    return sock


async def hop(request: web.Request) -> web.Response:
    resp = web.Response(text="hop\n")
    resp.headers["Connection"] = "close, X-Secret"
    resp.headers["X-Secret"] = "1"
    resp.headers["Keep-Alive"] = "timeout=5"
    resp.headers["Proxy-Connection"] = "keep-alive"
    resp.headers["Trailer"] = "X-Checksum"
    resp.headers["X-Kept"] = "yes"
    return resp


async def not_found(request: web.Request) -> web.Response:
    await _read_body(request)
    return web.Response(status=404, text="upstream: no such path\n")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def log(request: web.Request) -> web.Response:
    return web.json_response(request.app["log"])


async def reset(request: web.Request) -> web.Response:
    app = request.app
    app["log"].clear()
    app["state"].clear()
    app["release"].clear()
    return web.Response(text="reset\n")


async def state(request: web.Request) -> web.Response:
    return web.Response(text=request.app["state"].get(request.query.get("id", ""), "unknown"))


async def release(request: web.Request) -> web.Response:
    _event(request.app, request.query.get("id", "")).set()
    return web.Response(text="released\n")


def make_app(name: str) -> web.Application:
    app = web.Application(middlewares=[record], client_max_size=1024**3)
    app["name"] = name
    app["log"] = []
    app["state"] = {}
    app["release"] = {}
    app["counter"] = itertools.count(1)
    add = app.router.add_route
    get = app.router.add_get  # also answers HEAD
    get("/log", log)
    add("POST", "/reset", reset)
    get("/state", state)
    add("POST", "/release", release)
    get("/healthz", healthz)
    add("*", "/echo{tail:.*}", echo)
    add("*", "/status/{code:\\d+}", status)
    get("/bytes/{n:\\d+}", bytes_)
    get("/chunked/{n:\\d+}", chunked)
    get("/stream", stream)
    add("*", "/hold", hold)
    get("/cookies", cookies)
    get("/slow-headers", slow_headers)
    get("/slow-body", slow_body)
    get("/ws", ws)
    get("/hop", hop)
    add("*", "/{tail:.*}", not_found)
    return app


async def serve(port: int, name: str) -> None:
    runner = web.AppRunner(make_app(name), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"upstream {name} listening on 127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.name))


if __name__ == "__main__":
    main()
