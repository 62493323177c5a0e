#!/usr/bin/env python3
"""The reverse proxy a Python user would write: the benchmark's "naive" peer.

aiohttp's web server in front, ONE shared ``aiohttp.ClientSession`` (keep-alive,
no connection limit) behind, forwarding any method, path, query and body to a
single upstream and streaming the response back. Nothing clever on purpose:
this is the baseline the edge has to beat by a wide margin.

    python bench/naive_proxy.py --listen 127.0.0.1:8081 --upstream 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

# RFC 9110 §7.6.1 hop-by-hop headers (plus the non-standard Proxy-Connection).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

SESSION_KEY: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM_KEY: web.AppKey[str] = web.AppKey("upstream", str)


def _strip_hop_by_hop(headers) -> CIMultiDict[str]:
    drop = set(HOP_BY_HOP)
    for value in headers.getall("Connection", ()):
        drop.update(token.strip().lower() for token in value.split(",") if token.strip())
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION_KEY]
    url = URL(f"http://{request.app[UPSTREAM_KEY]}{request.raw_path}", encoded=True)
    data = request.content if request.body_exists else None
    response: web.StreamResponse | None = None
    try:
        async with session.request(
            request.method,
            url,
            headers=_strip_hop_by_hop(request.headers),
            data=data,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(_strip_hop_by_hop(upstream.headers))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (TimeoutError, aiohttp.ClientError) as exc:
        if response is not None and response.prepared:
            raise  # headers already sent: all we can do is drop the connection
        return web.Response(status=502, text=f"bad gateway: {exc.__class__.__name__}\n")


async def _session_ctx(app: web.Application):
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
    ) as session:
        app[SESSION_KEY] = session
        yield


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 8081))
    parser.add_argument("--upstream", type=_hostport, required=True)
    args = parser.parse_args(argv)

    host, port = args.listen
    if host not in ("127.0.0.1", "localhost"):
        parser.error("the naive proxy binds 127.0.0.1 only")

    app = web.Application()
    app[UPSTREAM_KEY] = "{}:{}".format(*args.upstream)
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
