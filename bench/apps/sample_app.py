"""A small demo upstream app: what the edge proxies to in `make run`, tests and benchmarks.

    python bench/apps/sample_app.py --port 9001 --name hello [--start-delay 2]

The local control plane runs one of these per allocation (`--name` is then the
allocation id; the environment variable ALLOCATION_ID overrides it). Binds
127.0.0.1 only. Routes:

    GET  /                 "hello from <name>"
    GET  <readiness path>  200 "ok" once started (default /healthz)
    *    /echo             the request body streamed back, same Content-Type
    GET  /ws               WebSocket echo (text and binary)
    GET  /sessions         {"active": <open websockets>, "in_flight": <other requests>}
    GET  /env              {"names": <its environment variables' names>, "home": $HOME,
                           "cwd": <working directory>}: what the control plane gave it
    GET  /leak?mb=N        allocate N MiB and keep it (provokes a memory limit)
    GET  /crash?code=N     answer, then exit the process with code N
    GET  /slow?seconds=S   sleep S seconds, then answer
    *    /hooks/<any>      a webhook receiver: each request appended as one JSON line
    *    /webhooks/<any>   to --record FILE (without one: the latest 1000 kept in memory),
                           answered with the status --status-file names (default 200)
    GET  /webhooks         {"count": N, "deliveries": [...]}: what the receivers got (read
                           from --record FILE when given: every instance, across restarts)
    *    /checkout         "order placed by <name>" (an ordinary non-idempotent POST)
    GET  /in-flight        {"in_flight", "max", "overloaded"}: requests in flight now, the
                           most seen at once, and how many got 503 "overloaded" (below);
                           `?reset=1` starts the count again. Neither it nor the readiness
                           path is counted.
    GET  /probes           {"readiness": {<User-Agent>: N}}: requests to the readiness path
                           so far (503 "starting" ones included), by User-Agent (the
                           edge's probes and the control plane's tell apart); not counted
                           in /in-flight either.

Start delay (`--start-delay`, or START_DELAY): the port is bound at once (so a
port handed out by the control plane is claimed early), but every route answers
503 "starting" until the delay has passed: the readiness probe sees "not ready".

Ready file (`--ready-file PATH`): after the start delay, keep answering 503 "starting"
until PATH exists, so a test decides when the app becomes ready instead of racing a delay.

Webhook status script (`--status-file`): whitespace-separated statuses, consumed
one per request, the last one repeating ("500 500 200": two failures, then
success). The file is re-read on every request, so a test can "fix" the app by
rewriting it. Several processes of the app share one file and one record.

Every response carries `X-Allocation-Id: <name>` and `X-App-Instance: <name>-<pid>`,
and echoes the request's `X-Request-Id` when it has one. Once the start delay is
over, every response also carries `X-Ready-At: <unix time, 6 decimals>`: the moment
the app began answering 2xx, so a client on the same machine can tell how long a
proxy in front took to deliver its first answer (bench/stampede.py). The 503
"starting" answers before that moment do not carry it.

Overload (`--max-in-flight N`): with more than N requests in flight at once, the one
over the limit is answered 503 "overloaded" at once, like a server with N threads or a
JVM still warming up; 0 (the default) answers everything.

SIGTERM/SIGINT: stop accepting connections, let in-flight requests finish (up to
--shutdown-timeout), close open WebSockets with 1001 (going away), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

MIB = 1024 * 1024
# Upper bounds on query parameters, so a typo cannot wedge the demo app.
MAX_LEAK_MB = 16 * 1024
MAX_SLOW_SECONDS = 3600.0


@dataclass
class AppState:
    """What the handlers share: identity, start state, sessions, leaked memory."""

    name: str
    readiness_path: str
    instance: str = ""
    started: bool = False
    # time.time() when the app began answering 2xx (end of the start delay); None before.
    ready_at: float | None = None
    in_flight: int = 0
    # Overload: above `max_in_flight` (0: no limit) a request gets 503; what was seen.
    max_in_flight: int = 0
    most_in_flight: int = 0
    overloaded: int = 0
    # Requests to the readiness path (answered 503 or 200) by User-Agent.
    probes: Counter[str] = field(default_factory=Counter)
    websockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    leaked: list[bytes] = field(default_factory=list)
    record: str = ""
    status_file: str = ""
    # The latest deliveries, for GET /webhooks when there is no --record file (bounded:
    # a benchmark sends many).
    deliveries: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=1000))

    def __post_init__(self) -> None:
        self.instance = f"{self.name}-{os.getpid()}"
        if self.started and self.ready_at is None:
            self.ready_at = time.time()

    def mark_started(self) -> None:
        """The start delay is over: answer 2xx from now on, and remember when that began."""
        self.ready_at = time.time()
        self.started = True


STATE_KEY = web.AppKey("state", AppState)


def _state(request: web.Request) -> AppState:
    return request.app[STATE_KEY]


async def index(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from {_state(request).name}\n")


async def ready(request: web.Request) -> web.Response:
    # Reaching a handler at all means the start delay is over (see the middleware).
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
    sockets = _state(request).websockets
    sockets.add(ws)
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
    finally:
        sockets.discard(ws)
    return ws


async def sessions(request: web.Request) -> web.Response:
    state = _state(request)
    # Open WebSockets are in-flight handlers too; report plain requests separately,
    # not counting this one.
    active = sum(1 for ws in state.websockets if not ws.closed)
    return web.json_response({"active": active, "in_flight": state.in_flight - active - 1})


async def environment(_: web.Request) -> web.Response:
    # Names only: the values may be secrets, and a test needs to know what is there.
    return web.json_response(
        {"names": sorted(os.environ), "home": os.environ.get("HOME", ""), "cwd": os.getcwd()}
    )


def _number(request: web.Request, key: str, default: float, limit: float) -> float:
    raw = request.query.get(key, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be a number\n") from None
    if not 0 <= value <= limit:
        raise web.HTTPBadRequest(text=f"{key} must be between 0 and {limit:g}\n")
    return value


async def leak(request: web.Request) -> web.Response:
    state = _state(request)
    mb = int(_number(request, "mb", 1, MAX_LEAK_MB))
    # b"\x01" * n writes every byte, so the pages are really resident (a zeroed
    # bytearray could stay untouched and never show up in RSS).
    state.leaked.append(b"\x01" * (mb * MIB))
    total = sum(len(chunk) for chunk in state.leaked) // MIB
    return web.json_response({"leaked_mb": mb, "total_mb": total})


async def crash(request: web.Request) -> web.Response:
    code = int(_number(request, "code", 1, 255))
    # Exit a moment after the answer is written; os._exit skips clean-up on purpose:
    # this is a crash, not a shutdown.
    asyncio.get_running_loop().call_later(0.1, os._exit, code)
    return web.Response(text=f"exiting with {code}\n")


async def slow(request: web.Request) -> web.Response:
    seconds = _number(request, "seconds", 1.0, MAX_SLOW_SECONDS)
    await asyncio.sleep(seconds)
    return web.Response(text=f"slept {seconds:g}s\n")


def _next_status(path: str) -> int:
    """Take the next status from the script file, keeping the last one (locked: shared)."""
    if not path:
        return 200
    with open(path, "r+") as script:
        fcntl.flock(script, fcntl.LOCK_EX)
        statuses = script.read().split()
        if not statuses:
            return 200
        if len(statuses) > 1:
            script.seek(0)
            script.truncate()
            script.write(" ".join(statuses[1:]))
        return int(statuses[0])


async def webhook(request: web.Request) -> web.Response:
    state = _state(request)
    body = await request.read()
    status = _next_status(state.status_file)
    delivery = {
        "method": request.method,
        "path": request.path_qs,
        "body": body.decode(errors="replace"),
        "event_id": request.headers.get("Stripe-Event-Id") or request.headers.get("X-Event-Id", ""),
        "queued_id": request.headers.get("X-Edge-Queued-Id", ""),
        "attempt": request.headers.get("X-Edge-Replay-Attempt", ""),
        "key": request.headers.get("Idempotency-Key", ""),
        "signature": request.headers.get("X-Signature", ""),
        "status": status,
        "instance": state.instance,
        "at": time.time(),
    }
    if not state.record:
        state.deliveries.append(delivery)
    else:
        line = json.dumps(delivery)
        # One write of a short line with O_APPEND: lines from several processes never mix.
        fd = os.open(state.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    return web.Response(status=status, text=f"webhook {status}\n")


async def list_deliveries(request: web.Request) -> web.Response:
    """What the webhook receivers got: the record file spans instances and restarts."""
    state = _state(request)
    received = list(state.deliveries)
    if state.record:
        try:
            with open(state.record) as record:
                received = [json.loads(line) for line in record if line.strip()]
        except FileNotFoundError:
            received = []
    body = json.dumps({"count": len(received), "deliveries": received}, indent=2)
    return web.Response(text=body + "\n", content_type="application/json")


async def in_flight(request: web.Request) -> web.Response:
    state = _state(request)
    body = {
        "in_flight": state.in_flight,
        "max": state.most_in_flight,
        "overloaded": state.overloaded,
    }
    if request.query.get("reset"):
        state.most_in_flight = state.overloaded = 0
    return web.json_response(body)


async def probes(request: web.Request) -> web.Response:
    return web.json_response({"readiness": dict(_state(request).probes)})


async def checkout(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text=f"order placed by {_state(request).name}\n")


@web.middleware
async def lifecycle(request: web.Request, handler) -> web.StreamResponse:
    """Count in-flight requests; answer 503 on every route until the start delay is over,
    and to a request over --max-in-flight."""
    state = _state(request)
    if request.path == state.readiness_path:
        state.probes[request.headers.get("User-Agent", "")] += 1
    if not state.started:
        return web.Response(status=503, text="starting\n", headers={"Retry-After": "1"})
    if request.path in (state.readiness_path, "/in-flight", "/probes"):
        return await handler(request)  # the probe and the count itself are not traffic
    state.in_flight += 1
    state.most_in_flight = max(state.most_in_flight, state.in_flight)
    try:
        if state.max_in_flight and state.in_flight > state.max_in_flight:
            state.overloaded += 1
            return web.Response(status=503, text="overloaded\n")
        return await handler(request)
    finally:
        state.in_flight -= 1


async def _stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    state = _state(request)
    response.headers["X-Allocation-Id"] = state.name
    response.headers["X-App-Instance"] = state.instance
    if state.ready_at is not None:
        response.headers["X-Ready-At"] = f"{state.ready_at:.6f}"
    request_id = request.headers.get("X-Request-Id")
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


async def _close_websockets(app: web.Application) -> None:
    # on_shutdown runs after the listener is closed and before in-flight handlers
    # are awaited: WebSocket handlers only end once their socket is closed.
    for ws in list(app[STATE_KEY].websockets):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def make_app(
    name: str,
    readiness_path: str = "/healthz",
    started: bool = True,
    record: str = "",
    status_file: str = "",
    max_in_flight: int = 0,
) -> web.Application:
    """The aiohttp application; `started=False` answers 503 until state.started is set."""
    app = web.Application(middlewares=[lifecycle], client_max_size=16 * MIB)
    app[STATE_KEY] = AppState(
        name=name,
        readiness_path=readiness_path,
        started=started,
        record=record,
        status_file=status_file,
        max_in_flight=max_in_flight,
    )
    app.on_response_prepare.append(_stamp_headers)
    app.on_shutdown.append(_close_websockets)
    routes = {
        "/": index,
        "/ws": websocket,
        "/sessions": sessions,
        "/env": environment,
        "/leak": leak,
        "/crash": crash,
        "/slow": slow,
        "/webhooks": list_deliveries,
        "/in-flight": in_flight,
        "/probes": probes,
    }
    # The readiness path wins over a route of the same path (e.g. --readiness-path /).
    routes[readiness_path] = ready
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    if readiness_path != "/echo":
        app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/hooks/{tail:.*}", webhook)
    app.router.add_route("*", "/webhooks/{tail:.*}", webhook)
    app.router.add_route("*", "/checkout", checkout)
    return app


async def serve(
    port: int,
    name: str,
    readiness_path: str,
    start_delay: float,
    shutdown_timeout: float,
    record: str = "",
    status_file: str = "",
    max_in_flight: int = 0,
    ready_file: str = "",
) -> int:
    """Bind, wait out the start delay (and the ready file), serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    started = start_delay <= 0 and not ready_file
    app = make_app(name, readiness_path, started, record, status_file, max_in_flight)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        # A deep accept queue: an edge releasing thousands of held requests connects at once.
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    except OSError as exc:
        print(f"sample app: cannot listen on 127.0.0.1:{port}: {exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    print(
        f"sample app {name!r} listening on http://127.0.0.1:{port}/ (pid {os.getpid()}, "
        f"ready after {max(start_delay, 0):g}s on {readiness_path})",
        flush=True,
    )
    if start_delay > 0:
        # A SIGTERM during the delay ends the wait early and shuts down as usual.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), start_delay)
    while ready_file and not stop.is_set() and not os.path.exists(ready_file):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    # Answering 2xx from here on (with no delay: from the moment the port is bound).
    app[STATE_KEY].mark_started()
    await stop.wait()
    # Closes the listener, closes idle keep-alive connections, runs on_shutdown
    # (WebSockets get 1001), then waits up to shutdown_timeout for in-flight handlers.
    await runner.cleanup()
    return 0


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"sample app: {name}={raw!r} is not a number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Demo upstream app for the edge proxy.")
    parser.add_argument("--port", type=int, default=9001, help="port on 127.0.0.1 (default 9001)")
    parser.add_argument(
        "--name",
        default="hello",
        help="name / allocation id shown in responses (env ALLOCATION_ID overrides)",
    )
    parser.add_argument(
        "--start-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="answer 503 for this long after binding (default: env START_DELAY or 0)",
    )
    parser.add_argument(
        "--readiness-path", default="/healthz", help="readiness probe path (default /healthz)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, wait this long for in-flight requests (default 10)",
    )
    parser.add_argument(
        "--record", default="", help="append each /hooks/ and /webhooks/ request to this file"
    )
    parser.add_argument(
        "--status-file", default="", help="statuses the webhook receivers answer with (default 200)"
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=0,
        metavar="N",
        help="answer 503 'overloaded' to a request over N in flight at once (default 0: off)",
    )
    parser.add_argument(
        "--ready-file",
        default="",
        metavar="PATH",
        help="after the start delay, answer 503 'starting' until PATH exists (default: off)",
    )
    args = parser.parse_args(argv)
    if args.max_in_flight < 0:
        parser.error("--max-in-flight must be 0 or more")
    if not args.readiness_path.startswith("/"):
        parser.error("--readiness-path must start with '/'")
    name = os.environ.get("ALLOCATION_ID") or args.name
    delay = args.start_delay if args.start_delay is not None else _env_float("START_DELAY", 0.0)
    return asyncio.run(
        serve(
            args.port,
            name,
            args.readiness_path,
            delay,
            args.shutdown_timeout,
            args.record,
            args.status_file,
            args.max_in_flight,
            args.ready_file,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
