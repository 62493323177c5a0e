#!/usr/bin/env python3
"""Why the edge's front is an httptools protocol, not aiohttp's server: the ceiling of each.

Both servers answer every request with the same fixed 1 KiB response and no
upstream at all, so the figure is the most requests/s a proxy built on that
front could ever reach on this machine. Loopback only, wrk (or, without it or
with --python-loadgen, the built-in asyncio load generator), bounded in time.
--quick: 1 s runs, no warm-up.

    .venv/bin/python bench/front_ceiling.py --json bench/results/front_ceiling.json

JSON keys (--json FILE):
    aiohttp_rps              requests/s of aiohttp's low-level web.Server
    httptools_rps            requests/s of an asyncio.Protocol on httptools
    httptools_over_aiohttp   the ratio of the two
    load_generator           wrk and its version, or the built-in generator
    duration_s               seconds per measured run
    warmup_s                 seconds of warm-up per server
    connections              load connections
    machine                  nproc, cpu, python, platform, load average at the start
    quick                    whether --quick sized the run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from bench_stack import (
    Processes,
    accepts,
    add_load_options,
    add_quick,
    apply_quick,
    free_port,
    load_generator_name,
    logger,
    machine_info,
    run_load,
    use_wrk,
    wait_until,
    warmup_s,
    write_json,
)

BODY = b"x" * 1024
QUICK = {"duration": 1.0, "warmup": 0.0}

log = logger("front-ceiling")


def serve_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handler(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=BODY)

    async def main() -> None:
        server = web.Server(handler, access_log=None)
        await asyncio.get_running_loop().create_server(server, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_httptools(port: int) -> None:
    import httptools
    import uvloop

    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)

    class Front(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(response)  # type: ignore[attr-defined]

    async def main() -> None:
        await asyncio.get_running_loop().create_server(Front, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    add_load_options(parser, 5.0)
    parser.add_argument("--serve", choices=["aiohttp", "httptools"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    if args.serve:
        (serve_aiohttp if args.serve == "aiohttp" else serve_httptools)(args.port)
        return 0
    wrk = use_wrk(args.python_loadgen)
    args.warmup = warmup_s(args)
    info = machine_info()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="front-ceiling-") as tmp:
        procs = Processes(Path(tmp))
        try:
            for kind in ("aiohttp", "httptools"):
                port = free_port()
                argv = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
                proc, log_path = procs.start(kind, argv)
                try:
                    wait_until(kind, lambda port=port: accepts(port), proc, log_path)
                    if args.warmup > 0:
                        run_load(port, args.warmup, args.connections, "localhost", wrk)
                    row = run_load(port, args.duration, args.connections, "localhost", wrk)
                finally:
                    procs.stop(proc)
                if row.get("error"):
                    log(f"{kind}: {row['error']}")
                    return 1
                results[f"{kind}_rps"] = row["rps"]
        finally:
            procs.stop_all()
    report = {
        **results,
        "httptools_over_aiohttp": round(results["httptools_rps"] / results["aiohttp_rps"], 2),
        "load_generator": load_generator_name(wrk),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "machine": info,
        "quick": args.quick,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report, __doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
