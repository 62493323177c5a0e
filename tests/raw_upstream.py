"""A raw asyncio HTTP/1.1 upstream for edge tests: exact control over bytes and framing.

Run as ``python tests/raw_upstream.py --port P [--name N] [--close-on-request K] [--paused]``.
It prints ``raw upstream N listening on 127.0.0.1:P`` once the socket listens.

- ``--close-on-request K``: the K-th request on every connection is read (head only),
  logged, and answered by closing the socket.
- ``--paused``: listen with backlog 0 but do not accept until SIGUSR1, so once the
  accept queue is full further connects hang (SYNs dropped).

Control (answered on any connection, never logged): ``GET /__stats`` -> JSON
``{"conns": {id: {...}}, "log": [...], "states": {...}}``; ``POST /__reset``.
Every other request is logged *before* its body is read: ``{conn, seq, method,
path, version, headers, body_len, trailers, complete}``.

Endpoints (query string after ``?``):
``/echo`` JSON about the request; ``/slow?delay=S`` the same after S seconds;
``/zeros?n=N&id=K`` N zero bytes with Content-Length, state K ``sending`` ->
``finished`` | ``peer_closed``; ``/eof?n=N`` close-delimited body (no length, not
chunked); ``/eofreset?n=N`` the same body, then a reset (RST) instead of a clean
close; ``/trailers`` chunked body with a trailer field; ``/slowread?chunk=C&delay=S``
reads the request body C bytes at a time with a pause; ``/tunnel?id=K`` answers 101
(whatever the request said) then echoes raw bytes, state K ``open`` -> ``eof``;
``/ghost`` a complete response followed, in the same write, by the head of a second
response nobody asked for; ``/drip?n=N&size=B&interval=S`` N*B bytes with Content-Length,
B bytes every S seconds; ``/bighead?n=N`` a response head with an N-byte field (then a
2-byte body).

Normal responses carry ``Keep-Alive: timeout=60``, a hop-by-hop field the edge must strip,
so a client seeing it got upstream bytes the edge did not reframe.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import socket
import struct
from urllib.parse import parse_qs, urlsplit

MiB = 1024 * 1024
ZEROS = memoryview(bytes(MiB))
PATTERN = bytes(range(256)) * 256  # 64 KiB


def eof_body(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


class Request:
    __slots__ = ("headers", "method", "path", "query", "target", "version")

    def __init__(self, method: str, target: str, version: str, headers: list[list[str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        parts = urlsplit(target)
        self.path = parts.path
        self.query = {k: v[0] for k, v in parse_qs(parts.query).items()}

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def wants_close(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" not in conn
        return "close" in conn


class Server:
    def __init__(self, name: str, close_on_request: int) -> None:
        self.name = name
        self.close_on_request = close_on_request
        self.ids = itertools.count(1)
        self.conns: dict[int, dict] = {}
        self.log: list[dict] = []
        self.states: dict[str, str] = {}

    # ------------------------------------------------------------------ parsing

    async def read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append([k.strip(), v.strip()])
        return Request(method, target, version, headers)

    async def read_body(
        self, reader: asyncio.StreamReader, req: Request, entry: dict | None, chunk=65536, delay=0.0
    ) -> int:
        total = 0
        trailers: list[list[str]] = []
        if (req.header("transfer-encoding") or "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        if line == b"\r\n":
                            break
                        k, _, v = line.decode("latin-1").partition(":")
                        trailers.append([k.strip(), v.strip()])
                    break
                left = size
                while left:
                    data = await reader.read(min(left, chunk))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    total += len(data)
                    if delay:
                        await asyncio.sleep(delay)
                await reader.readexactly(2)
        else:
            left = int(req.header("content-length") or 0)
            while left:
                data = await reader.read(min(left, chunk))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                total += len(data)
                if delay:
                    await asyncio.sleep(delay)
        if entry is not None:
            entry["body_len"] = total
            entry["trailers"] = trailers
            entry["complete"] = True
        return total

    # ---------------------------------------------------------------- responses

    @staticmethod
    def head(status: str, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def response(self, body: bytes, *, close: bool, ctype="application/json") -> bytes:
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        headers.append(("Connection", "close") if close else ("Keep-Alive", "timeout=60"))
        return self.head("200 OK", headers) + body

    def describe(self, req: Request, entry: dict) -> bytes:
        out = dict(entry, server=self.name)
        return json.dumps(out).encode()

    # --------------------------------------------------------------- per client

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = next(self.ids)
        seq = 0
        info: dict | None = None
        try:
            while True:
                req = await self.read_request(reader)
                if req is None:
                    if info is not None:
                        info["peer_eof"] = True
                    return
                if req.path.startswith("/__"):
                    await self.control(req, reader, writer)
                    if req.wants_close():
                        return
                    continue
                seq += 1
                if info is None:
                    info = self.conns[cid] = {"requests": 0, "peer_eof": False, "error": None}
                info["requests"] = seq
                entry = {
                    "conn": cid,
                    "seq": seq,
                    "method": req.method,
                    "path": req.target,
                    "version": req.version,
                    "headers": req.headers,
                    "body_len": None,
                    "trailers": None,
                    "complete": False,
                }
                self.log.append(entry)
                if self.close_on_request and seq == self.close_on_request:
                    info["closed_by_us"] = True
                    return
                keep = await self.route(req, entry, reader, writer)
                if not keep or req.wants_close():
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            if info is not None:
                info["error"] = type(exc).__name__
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def control(self, req: Request, reader, writer) -> None:
        await self.read_body(reader, req, None)
        if req.path == "/__reset":
            self.conns.clear()
            self.log.clear()
            self.states.clear()
            body = b"reset\n"
        else:
            body = json.dumps(
                {"conns": self.conns, "log": self.log, "states": self.states}
            ).encode()
        writer.write(self.response(body, close=req.wants_close()))
        await writer.drain()

    async def route(self, req: Request, entry: dict, reader, writer) -> bool:
        q = req.query
        path = req.path
        head_only = req.method == "HEAD"
        if path == "/slowread":
            chunk = int(q.get("chunk", "65536"))
            await self.read_body(reader, req, entry, chunk=chunk, delay=float(q.get("delay", "0")))
        else:
            await self.read_body(reader, req, entry)

        if path == "/zeros":
            n = int(q.get("n", "0"))
            key = q.get("id", "")
            self.states[key] = "sending"
            headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))]
            writer.write(self.head("200 OK", headers))
            if head_only:
                return True
            try:
                left = n
                while left:
                    part = ZEROS[: min(left, MiB)]
                    writer.write(part)
                    left -= len(part)
                    await writer.drain()
            except ConnectionError:
                self.states[key] = "peer_closed"
                raise
            self.states[key] = "finished"
            return True
        if path == "/eof":
            n = int(q.get("n", "0"))
            writer.write(self.head("200 OK", [("Content-Type", "application/octet-stream")]))
            writer.write(eof_body(n))
            await writer.drain()
            return False  # the body ends when the connection closes
        if path == "/eofreset":
            n = int(q.get("n", "0"))
            writer.write(self.head("200 OK", [("Content-Type", "application/octet-stream")]))
            writer.write(eof_body(n))
            await writer.drain()
            await asyncio.sleep(0.3)  # the edge has read the body by now
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # closed with linger 0: a reset, not a FIN
            return False
        if path == "/trailers":
            headers = [
                ("Content-Type", "text/plain"),
                ("Transfer-Encoding", "chunked"),
                ("Trailer", "X-Trailer"),
            ]
            body = b"7\r\nhello, \r\n8\r\ntrailers\r\n0\r\nX-Trailer: secret\r\n\r\n"
            writer.write(self.head("200 OK", headers) + (b"" if head_only else body))
            await writer.drain()
            return True
        if path == "/tunnel":
            key = q.get("id", "")
            self.states[key] = "open"
            headers = [("Upgrade", "raw-echo"), ("Connection", "Upgrade")]
            writer.write(self.head("101 Switching Protocols", headers))
            await writer.drain()
            while True:
                data = await reader.read(MiB)
                if not data:
                    self.states[key] = "eof"
                    return False
                writer.write(data)
                await writer.drain()
        if path == "/ghost":
            body = self.describe(req, entry)
            ghost = self.head("200 OK", [("Content-Length", "100000")])
            writer.write(self.response(body, close=False) + ghost)
            await writer.drain()
            return True
        if path == "/drip":
            n, size = int(q.get("n", "10")), int(q.get("size", "1000"))
            interval = float(q.get("interval", "0.2"))
            headers = [("Content-Type", "text/plain"), ("Content-Length", str(n * size))]
            writer.write(self.head("200 OK", headers))
            for _ in range(n):
                writer.write(b"d" * size)
                await writer.drain()
                await asyncio.sleep(interval)
            return True
        if path == "/bighead":
            big = "b" * int(q.get("n", "0"))
            headers = [("X-Big", big), ("Content-Length", "2")]
            writer.write(self.head("200 OK", headers) + b"ok")
            await writer.drain()
            return True
        if path == "/slow":
            await asyncio.sleep(float(q.get("delay", "0.5")))
        # /echo, /slow, /slowread and anything else: describe the request.
        body = self.describe(req, entry)
        resp = self.response(body, close=req.wants_close())
        if head_only:
            resp = resp[: resp.index(b"\r\n\r\n") + 4]
        writer.write(resp)
        await writer.drain()
        return True


async def serve(port: int, name: str, close_on_request: int, paused: bool) -> None:
    server = Server(name, close_on_request)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(0 if paused else 128)
    sock.setblocking(False)
    # start_serving() re-listens with this backlog (asyncio also accepts at most `backlog`
    # connections per wake-up, so it must not be 0); until then the queue holds one.
    srv = await asyncio.start_server(
        server.handle, sock=sock, limit=MiB, backlog=128, start_serving=False
    )
    if paused:
        resume = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, resume.set)
        print(f"raw upstream {name} listening (paused) on 127.0.0.1:{port}", flush=True)
        await resume.wait()
    await srv.start_serving()
    print(f"raw upstream {name} listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="raw")
    parser.add_argument("--close-on-request", type=int, default=0)
    parser.add_argument("--paused", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.name, args.close_on_request, args.paused))


if __name__ == "__main__":
    main()
