"""Pooled keep-alive HTTP/1.1 connections to upstreams, on asyncio protocols and httptools.

A connection carries one exchange at a time for one owner (a front connection, or the
awaitable client in edge/upstream/client.py). Parser events go straight to the owner's
callbacks, so response bytes are written to the client without queues or tasks;
back-pressure is passed both ways by pausing the other side's transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

if TYPE_CHECKING:
    from edge.routing.concurrency_limit import Gate

# A response head (status line and fields) larger than this is refused, like a request's.
DEFAULT_MAX_RESPONSE_HEAD = 64 * 1024
HEAD_TOO_LARGE = "head_too_large"


class ResponseHeadTooLarge(Exception):
    """The upstream's response head passed the connection's `max_head`."""


class UpstreamOwner(Protocol):
    """What a connection reports to the exchange that is using it."""

    def upstream_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: list
    ) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_end(self, conn: UpstreamConnection) -> None: ...
    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None: ...
    def upstream_tunnel_data(self, data: bytes) -> None: ...
    def upstream_lost(self, conn: UpstreamConnection, error: str) -> None: ...
    def upstream_flush(self) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to one upstream peer."""

    __slots__ = (
        "closed",
        "got_bytes",
        "head_bytes",
        "head_only",
        "headers",
        "idle_since",
        "in_head",
        "interim",
        "max_head",
        "owner",
        "parser",
        "peer",
        "reason",
        "reusable",
        "reused",
        "transport",
        "upgraded",
    )

    def __init__(self, peer: UpstreamPeer, max_head: int = DEFAULT_MAX_RESPONSE_HEAD) -> None:
        self.peer = peer
        self.max_head = max_head
        self.in_head = True  # reading a response head: its bytes are counted
        self.head_bytes = 0
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.owner: UpstreamOwner | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.interim = False
        self.head_only = False
        self.got_bytes = False
        self.reused = False
        self.reusable = False
        self.upgraded = False
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the upstream broke framing; never reuse it.
            self.abort()
            return
        if self.upgraded:
            owner.upstream_tunnel_data(data)
            return
        self.got_bytes = True
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.upgraded = True
            owner.upstream_upgraded(self, data[exc.args[0] :])
        except HttpParserError as exc:
            self.abort()
            too_large = isinstance(exc.__context__, ResponseHeadTooLarge)
            owner.upstream_lost(self, HEAD_TOO_LARGE if too_large else "bad_response")
            return
        if self.in_head and self.head_bytes > self.max_head:
            # httptools keeps an unfinished field whole: bound what it may buffer.
            self.abort()
            owner.upstream_lost(self, HEAD_TOO_LARGE)
            return
        owner.upstream_flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.peer.release()
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.upstream_lost(self, "reset" if exc is not None else "closed")
        else:
            self.peer.forget(self)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_client_reading()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_client_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.owner is None and not self.closed:
            # A response past the end of the exchange: the upstream broke framing.
            self.abort()
            return
        self.headers = []
        self.reason = b""
        self.in_head = True
        self.head_bytes = 0

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.max_head:
            raise ResponseHeadTooLarge

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        parser = self.parser
        status = parser.get_status_code()
        if status < 200 and status != 101:
            self.interim = True
            return
        self.reusable = parser.should_keep_alive()
        owner = self.owner
        if owner is None:
            return
        owner.upstream_head(self, status, self.reason, self.headers)
        if self.head_only and status != 101 and self.owner is owner:
            # A HEAD response announces a body it never sends; llhttp cannot be told,
            # so the exchange ends here and the next response gets a fresh parser.
            self.parser = HttpResponseParser(self)
            owner.upstream_end(self)

    def on_body(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.upstream_body(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        owner = self.owner
        # 101 ends the HTTP message but not the exchange: the tunnel follows.
        if owner is not None and not self.head_only and self.parser.get_status_code() != 101:
            owner.upstream_end(self)

    # used by owners

    def keep_alive(self) -> bool:
        return self.reusable and not self.closed and not self.upgraded

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def unsent(self) -> int:
        """Bytes written that the kernel did not take yet: the loop sends them later."""
        if self.transport is None or self.closed:
            return 0
        return self.transport.get_write_buffer_size()

    def writable(self) -> bool:
        """Nothing left unsent and the kernel takes more now (POLLOUT): a short write made
        next goes into the kernel within that call, not later by the loop."""
        if self.transport is None or self.closed or self.unsent():
            return False
        poller = select.poll()
        poller.register(self.transport.get_extra_info("socket").fileno(), select.POLLOUT)
        return bool(poller.poll(0))

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Drop the connection now; the owner (if any) is detached first."""
        self.owner = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPeer:
    """One upstream address: its connections (capped), idle ones, and requests waiting.

    At most `max_conns` connections exist at once (connecting, busy or idle), so a
    burst of released requests cannot overflow an app's accept queue; the rest
    wait in arrival order for a connection to come back. At most `max_connecting` of
    them are being opened at once: a burst at an allocation with no idle connections
    (a wake's release) opens them a few at a time, and the first answers come back
    while the rest wait to reuse them instead of all waiting behind every connect.
    """

    __slots__ = (
        "address",
        "connecting",
        "gate",
        "handoff_scheduled",
        "host",
        "idle",
        "in_flight",
        "max_connecting",
        "max_conns",
        "max_idle",
        "open",
        "port",
        "waiters",
    )

    def __init__(
        self, host: str, port: int, max_idle: int, max_conns: int = 0, max_connecting: int = 0
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.max_idle = max_idle
        self.max_conns = max_conns  # 0: no cap
        self.max_connecting = max_connecting  # 0: no cap
        self.connecting = 0  # of `open`: reserved and not connected (or failed) yet
        self.idle: list[UpstreamConnection] = []
        self.in_flight = 0  # requests sent, or waiting for a connection or in the gate's line
        self.open = 0
        self.handoff_scheduled = False
        self.waiters: deque[Callable[[UpstreamConnection | None], bool]] = deque()
        # The app's concurrency limit at this allocation (edge/routing/concurrency_limit.py);
        # None (no limit) costs the front one attribute check per request.
        self.gate: Gate | None = None

    def _room(self) -> bool:
        return (not self.max_conns or self.open < self.max_conns) and (
            not self.max_connecting or self.connecting < self.max_connecting
        )

    def reserve(self) -> bool:
        """Room for one more connection? Counts it as open and connecting when so; its
        connect ends with `connected()`, made or not."""
        if not self._room():
            return False
        self.open += 1
        self.connecting += 1
        return True

    def connected(self) -> None:
        """A connect reserved here ended (made or failed): the next in line may connect."""
        self.connecting -= 1
        self._offer_room()

    def release(self) -> None:
        """A connection closed (or never opened): hand its room to a waiter."""
        self.open -= 1
        self._offer_room()

    def _offer_room(self) -> None:
        """Room for one connection more, to the first waiter still waiting."""
        while self.waiters and self._room():
            self.open += 1
            self.connecting += 1
            if self.waiters.popleft()(None):
                return
            self.open -= 1
            self.connecting -= 1

    def wait(self, waiter: Callable[[UpstreamConnection | None], bool]) -> None:
        self.waiters.append(waiter)

    def unwait(self, waiter: Callable[[UpstreamConnection | None], bool]) -> None:
        """Leave the line: the request gave up (timed out, its client went away)."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def _hand_off(self) -> None:
        self.handoff_scheduled = False
        while self.waiters:
            conn = self.take_idle()
            if conn is None:
                return
            if not self.waiters.popleft()(conn):
                conn.reused = False
                self.idle.append(conn)

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def give_back(self, conn: UpstreamConnection, now: float) -> None:
        conn.owner = None
        if conn.closed:
            return
        if self.waiters:
            # Handed over on the next loop turn, once this response's bytes are parsed:
            # stray bytes after it abort the connection first (see on_message_begin).
            if not self.handoff_scheduled:
                self.handoff_scheduled = True
                asyncio.get_running_loop().call_soon(self._hand_off)
        elif len(self.idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = now
        conn.head_only = False
        conn.got_bytes = False
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close_idle_before(self, cutoff: float) -> None:
        """Close connections idle since before `cutoff` (oldest sit at the front)."""
        while self.idle and self.idle[0].idle_since < cutoff:
            self.idle.pop(0).abort()

    def close_all(self) -> None:
        while self.idle:
            self.idle.pop().abort()


class UpstreamPool:
    """Every upstream peer this worker talks to, keyed by address."""

    __slots__ = (
        "_peers",
        "connect_timeout",
        "keepalive_idle",
        "max_connecting",
        "max_conns",
        "max_head",
        "max_idle",
    )

    def __init__(
        self,
        *,
        connect_timeout: float,
        keepalive_idle: float,
        max_idle: int,
        max_conns: int = 0,
        max_connecting: int = 0,
        max_head: int = DEFAULT_MAX_RESPONSE_HEAD,
    ) -> None:
        self._peers: dict[str, UpstreamPeer] = {}
        self.max_head = max_head
        self.connect_timeout = connect_timeout
        self.keepalive_idle = keepalive_idle
        self.max_idle = max_idle
        self.max_conns = max_conns
        self.max_connecting = max_connecting

    def peer(self, address: str) -> UpstreamPeer:
        peer = self._peers.get(address)
        if peer is None:
            host, _, port = address.rpartition(":")
            peer = self._peers[address] = UpstreamPeer(
                host.strip("[]"), int(port), self.max_idle, self.max_conns, self.max_connecting
            )
        return peer

    async def connect(self, peer: UpstreamPeer) -> UpstreamConnection:
        """Open a new connection in the room `peer.reserve()` gave; raises TimeoutError or
        OSError. Either way the connect has ended for the peer's count."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(peer, self.max_head), peer.host, peer.port
                )
        finally:
            peer.connected()
        return conn

    def peers(self) -> Iterable[UpstreamPeer]:
        return self._peers.values()

    def sweep(self, now: float) -> None:
        cutoff = now - self.keepalive_idle
        for peer in self._peers.values():
            peer.close_idle_before(cutoff)

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close_all()
