#!/usr/bin/env python3
"""Why the edge's front is an httptools protocol, not aiohttp's server: the ceiling of each.

Both servers answer every request with the same fixed 1 KiB response and no
upstream at all, so the figure is the most requests/s a proxy built on that
front could ever reach on this machine. Loopback only, wrk, bounded in time.

    .venv/bin/python bench/front_ceiling.py --json bench/results/front_ceiling.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BODY = b"x" * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def wrk(port: int, duration: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{duration}s", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--serve", choices=["aiohttp", "httptools"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_aiohttp if args.serve == "aiohttp" else serve_httptools)(args.port)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is required (Debian package wrk)", file=sys.stderr)
        return 1
    results: dict[str, float] = {}
    for kind in ("aiohttp", "httptools"):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(port)],
        )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            wrk(port, 1)
            results[f"{kind}_rps"] = wrk(port, args.duration)
        finally:
            proc.terminate()
            proc.wait(10)
    results["httptools_over_aiohttp"] = round(results["httptools_rps"] / results["aiohttp_rps"], 2)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
