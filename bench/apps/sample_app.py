"""A small demo upstream app: the thing the edge proxies to in `make run` and tests.

    python bench/sample_app.py --port 9001 --name hello

Binds 127.0.0.1 only. Routes:

    GET  /          "hello from <name>"
    GET  /healthz   200 "ok" (readiness probe)
    *    /echo      the request body streamed back, same Content-Type
    GET  /ws        WebSocket echo (text and binary)

Every response carries `X-App-Instance: <name>-<pid>` and echoes the request's
`X-Request-Id` when it has one. SIGTERM/SIGINT stop it cleanly (exit 0), so the
local control plane can run it as a subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys

from aiohttp import WSMsgType, web

NAME_KEY = web.AppKey("name", str)
INSTANCE_KEY = web.AppKey("instance", str)


async def index(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from {request.app[NAME_KEY]}\n")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def echo(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_type = request.content_type
    if request.content_length is not None:
        response.content_length = request.content_length
    await response.prepare(request)
    async for chunk in request.content.iter_chunked(64 * 1024):
        await response.write(chunk)
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def _stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-App-Instance"] = request.app[INSTANCE_KEY]
    request_id = request.headers.get("X-Request-Id")
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


def make_app(name: str) -> web.Application:
    app = web.Application()
    app[NAME_KEY] = name
    app[INSTANCE_KEY] = f"{name}-{os.getpid()}"
    app.on_response_prepare.append(_stamp_headers)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/ws", websocket)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Demo upstream app for the edge proxy.")
    parser.add_argument("--port", type=int, default=9001, help="port on 127.0.0.1 (default 9001)")
    parser.add_argument("--name", default="hello", help="app name shown in responses")
    args = parser.parse_args(argv)
    print(
        f"sample app {args.name!r} listening on http://127.0.0.1:{args.port}/ (pid {os.getpid()})",
        flush=True,
    )
    try:
        web.run_app(
            make_app(args.name),
            host="127.0.0.1",
            port=args.port,
            access_log=None,
            print=None,
            shutdown_timeout=5.0,
        )
    except OSError as exc:
        print(f"sample app: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
