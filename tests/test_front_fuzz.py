"""Hostile byte streams at the front, property-based, with a recording upstream behind it.

The invariant, as h11's fuzzing states it for a parser boundary: whatever a client sends,
it gets well-formed responses or a clean close, within the edge's own time bounds; the
upstream receives only well-framed requests that the client actually sent (no smuggling,
no splitting); the edge never answers 500 and never logs an internal error, and every
connection it opened is closed afterwards.

The streams are requests built from parts an attacker would pick (conflicting framing,
bad chunk sizes, obs-fold, NUL and bare CR/LF, absolute-form targets, Upgrade with a
body, a request hidden in a body), pipelined, mutated, and cut into arbitrary writes.
`FUZZ_EXAMPLES` sets the number of examples (default 120; `make fuzz` runs a soak).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httptools
import pytest
from helpers import app_entry, metric_sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HOST = b"fuzz.localhost"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
# The edge's bounds in this module: a connection that stays open longer than the largest
# of them, plus slack, is a hang.
BOUNDS = {"header_timeout": "2s", "keepalive_timeout": "2s"}
UPSTREAM_BOUNDS = {"response_header_timeout": "2s", "idle_timeout": "2s"}
HANG = 8.0
SMUGGLE = b"/smuggled"


# --------------------------------------------------------------- the recording upstream


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


@dataclass
class Recorder:
    """What the upstream saw: complete requests, and every framing error it met."""

    requests: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> tuple[list[Received], list[str]]:
        with self.lock:
            taken = (self.requests, self.errors)
            self.requests, self.errors = [], []
            return taken


class StrictUpstream(asyncio.Protocol):
    """Parses with httptools (strict); answers each request 200 with a small body."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: Received | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the edge forwards an Upgrade head; this upstream never switches
        except httptools.HttpParserError as exc:
            with self.recorder.lock:
                self.recorder.errors.append(f"upstream got a malformed request: {exc}")
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.headers = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current = Received(self.parser.get_method(), self.url, self.headers)

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current.body += body

    def on_message_complete(self) -> None:
        received, self.current = self.current, None
        if received is None:
            return
        with self.recorder.lock:
            self.recorder.requests.append(received)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
            )


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    address: list[str] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            loop.create_server(lambda: StrictUpstream(recorder), "127.0.0.1", 0)
        )
        address.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        started.set()
        loop.run_forever()
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield address[0], recorder
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def fuzz_edge(module_edge_launcher, recording_upstream):
    address, _ = recording_upstream
    return module_edge_launcher(
        apps=[app_entry("fuzz", [HOST.decode()], address)],
        limits=BOUNDS,
        upstream=UPSTREAM_BOUNDS,
    )


# ------------------------------------------------------------------------ the streams

# No HEAD: a response to HEAD has no body whatever its Content-Length, which a checker
# that does not know which request a response answers cannot tell (test_proxy_* cover HEAD).
METHODS = [b"GET", b"POST", b"PUT", b"OPTIONS", b"DELETE", b"PATCH", b"CONNECT",
           b"TRACE", b"get", b"G\x00T", b"", b"GET GET"]  # fmt: skip
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect",
         b"Upgrade", b"X-Request-Id", b"Idempotency-Key", b"Content-Type", b"Trailer",
         b" Host", b"Content-Length ", b"Transfer-Encoding\x00", b"X-Fuzz", b"", b"Te"]  # fmt: skip
VALUES = [b"chunked", b"chunked, identity", b"gzip, chunked", b"identity", b"Chunked",
          b"0", b"5", b" 5", b"5, 5", b"-1", b"0x10", b"99999999999999999999", b"100-continue",
          b"close", b"keep-alive", b"Upgrade", b"websocket", b"h2c", HOST,
          b"fuzz.localhost:80", b"evil.com,fuzz.localhost", b"a\rb", b"a\nb", b"\x00",
          b"\xff\xfe", b""]  # fmt: skip
SEPARATORS = [b"\r\n", b"\n", b"\r", b"\r\n ", b"\r\n\t"]


def target_for(n: int) -> st.SearchStrategy[bytes]:
    path = b"/fz/%d" % n
    return st.sampled_from(
        [
            path,
            path + b"?q=1",
            b"http://" + HOST + path,
            b"HTTP://" + HOST + path,
            b"http://evil.com" + path,
            b"*",
            b"//" + HOST + path,
            path + b"#frag",
            b"http://user@" + HOST + path,
            path + b" x",
            path + b"\x00",
        ]
    )


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    parts = []
    for piece in draw(st.lists(st.binary(max_size=24), max_size=3)):
        size = draw(st.sampled_from([b"%x" % len(piece), b"%X" % len(piece), b"zz",
                                     b"%x;ext=1" % len(piece), b"-1", b"%x " % len(piece),
                                     b"ffffffffffffffffff"]))  # fmt: skip
        parts.append(size + draw(st.sampled_from(SEPARATORS)) + piece + b"\r\n")
    ending = draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0\r\n", b""]))
    return b"".join(parts) + ending


HIDDEN = b"GET " + SMUGGLE + b" HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n"


@st.composite
def request(draw: st.DrawFn, n: int) -> bytes:
    """One request as an attacker would write it; sometimes well-formed."""
    method = draw(st.sampled_from(METHODS))
    target = draw(target_for(n))
    version = draw(st.sampled_from(VERSIONS))
    sep = draw(st.sampled_from(SEPARATORS)) if draw(st.booleans()) else b"\r\n"
    head = [method + b" " + target + b" " + version]
    if draw(st.integers(0, 9)) < 8:
        head.append(b"Host: " + HOST)
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES))
        value = draw(st.sampled_from(VALUES) | st.binary(max_size=12))
        head.append(name + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + value)
    body_kind = draw(st.sampled_from(["none", "length", "chunked", "hidden", "raw"]))
    body = b""
    if body_kind == "length":
        body = draw(st.binary(max_size=32))
        head.append(b"Content-Length: %d" % draw(st.sampled_from([len(body), len(body) + 3, 0])))
    elif body_kind == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        body = draw(chunked_body())
    elif body_kind == "hidden":
        # A request inside a body: forwarded only as body bytes, never as a request.
        body = HIDDEN
        framing = draw(st.sampled_from([b"length", b"te+cl", b"cl+cl"]))
        if framing == b"length":
            head.append(b"Content-Length: %d" % len(body))
        elif framing == b"te+cl":
            head += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
            body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        else:
            head += [b"Content-Length: 0", b"Content-Length: %d" % len(body)]
    elif body_kind == "raw":
        body = draw(st.binary(max_size=32))
    return sep.join(head) + sep + sep + body


@st.composite
def stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Pipelined requests, maybe mutated, and where to cut them into writes."""
    data = b"".join(draw(request(n)) for n in range(draw(st.integers(1, 3))))
    for _ in range(draw(st.integers(0, 2))):  # flip, drop or insert a byte
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "drop", "insert"]))
        if action == "flip":
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif action == "drop":
            data = data[:at] + data[at + 1 :]
        else:
            data = data[:at] + draw(st.sampled_from([b"\r", b"\n", b"\x00", b" "])) + data[at:]
    cuts = sorted(draw(st.lists(st.integers(0, max(0, len(data))), max_size=3)))
    return data, cuts


# ---------------------------------------------------------------------- the exchange


@dataclass
class Answer:
    data: bytes
    reset: bool
    seconds: float


def talk(port: int, data: bytes, cuts: list[int]) -> Answer:
    """Send `data` in pieces, half-close, read until the edge closes (bounded)."""
    started = time.monotonic()
    out = bytearray()
    reset = False
    with socket.create_connection(("127.0.0.1", port), timeout=HANG) as sock:
        try:
            last = 0
            for cut in [*cuts, len(data)]:
                if cut > last:
                    sock.sendall(data[last:cut])
                    last = cut
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # reset, or already closed by the edge: read what came first
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                pytest.fail(f"the edge kept the connection open past {HANG}s for {data!r}")
            except OSError:  # a reset: what arrived before it is still checked
                reset = True
                break
            if not chunk:
                break
            out += chunk
            if time.monotonic() - started > HANG:
                pytest.fail(f"the edge kept the connection open past {HANG}s for {data!r}")
    return Answer(bytes(out), reset, time.monotonic() - started)


class ResponseCheck:
    """httptools over the client's bytes: only whole, well-formed responses."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.statuses: list[int] = []
        self.kinds: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_message = False

    def on_message_begin(self) -> None:
        self.in_message = True
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())
        self.kinds.append(dict(self.headers).get(b"x-edge-error", b""))

    def on_message_complete(self) -> None:
        self.in_message = False

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pytest.fail("the edge switched protocols although no upstream agreed to")


def sent_targets(data: bytes) -> set[bytes]:
    """Every /fz/N path (and `*`) that appears in what the client sent."""
    found = {b"*"} if b" * " in data else set()
    for piece in data.split(b"/fz/")[1:]:
        digits = piece[: len(piece) - len(piece.lstrip(b"0123456789"))]
        if digits:
            found.add(b"/fz/" + digits)
    return found


# ------------------------------------------------------------------------- the tests


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The same examples on every `make test` run; a soak (`make fuzz`) explores anew.
    derandomize=EXAMPLES <= 500,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=stream())
def test_any_input_gets_well_formed_answers_and_nothing_is_smuggled(
    fuzz_edge, recording_upstream, case: tuple[bytes, list[int]]
) -> None:
    data, cuts = case
    _, recorder = recording_upstream
    recorder.take()
    answer = talk(fuzz_edge.port, data, cuts)
    check = ResponseCheck()
    try:
        check.feed(answer.data)
    except httptools.HttpParserError as exc:
        pytest.fail(f"malformed response {answer.data[:300]!r} to {data!r}: {exc}")
    if check.in_message and not answer.reset:
        pytest.fail(f"a response was cut short by a clean close: {answer.data[-200:]!r}")
    assert 500 not in check.statuses and b"internal" not in check.kinds, (data, answer.data)
    # What reached the upstream: requests the client sent, whole and well framed.
    time.sleep(0.02)  # the upstream thread records what the edge wrote before its answer
    received, errors = recorder.take()
    assert not errors, (errors, data)
    allowed = sent_targets(data)
    for got in received:
        assert SMUGGLE not in got.target, f"smuggled {got.target!r} out of {data!r}"
        named = sent_targets(b" " + got.target + b" ")
        assert named and named <= allowed, f"upstream got {got.target!r}, not sent in {data!r}"
    assert len(received) <= len(allowed) + data.count(b"/fz/"), (received, data)


def test_the_edge_survived_the_fuzzing_without_errors_or_leaks(fuzz_edge) -> None:
    """Runs after the property (same module): nothing raised, nothing left open."""
    assert fuzz_edge.proc.poll() is None, fuzz_edge.output()
    deadline = time.monotonic() + 10
    while metric_sum(fuzz_edge.metrics(), "edge_open_connections") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_sum(fuzz_edge.metrics(), "edge_open_connections") == 0
    log = fuzz_edge.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_a_refusal_while_the_upstream_connection_is_being_opened(
    start_edge, recording_upstream
) -> None:
    """A chunked POST whose bad chunk arrives in the same write as its head: the edge has
    started opening an upstream connection when it refuses the request; the connect that
    follows must not act on the finished exchange (found by `make fuzz`)."""
    address, _ = recording_upstream
    edge = start_edge(apps=[app_entry("fuzz", [HOST.decode()], address)])
    for _ in range(3):
        answer = talk(
            edge.port,
            b"POST /fz/0 HTTP/1.1\r\nHost: fuzz.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n",
            [],
        )
        check = ResponseCheck()
        check.feed(answer.data)
        assert check.statuses == [400], answer
    time.sleep(0.5)  # the connect attempts finish
    log = edge.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "never retrieved" not in log, log[-2000:]
    assert metric_sum(edge.metrics(), "edge_open_connections") == 0
