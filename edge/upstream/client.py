"""Awaitable whole-response exchanges over the pool's `UpstreamConnection` (replay uses it).

The client is just another owner of an `UpstreamConnection`: the connection parses
the response and calls back here, as it does for the client-facing front, so HTTP/1.1
response handling (1xx, HEAD, keep-alive, upgrades, framing errors) exists once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.upstream.pool import UpstreamConnection, UpstreamPeer


@dataclass(slots=True)
class UpstreamResponse:
    """The final answer: status, reason, headers and the first `keep_body` body bytes."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    # 101 with an Upgrade: the connection is closed here, the client speaks no tunnel.
    upgraded: bool = False


class UpstreamFailed(Exception):
    """Timed out, or the connection failed before a whole response arrived."""


class MalformedResponse(UpstreamFailed):
    """The upstream's bytes are not an HTTP/1.1 response (the parser refused them)."""


class Withheld(Exception):
    """The caller's `may_send` said no: the request's last byte never went out, so the
    upstream holds no whole request (and, the connection closed, never will)."""


MALFORMED = "malformed response"
# How often a gated write looks again whether the upstream took the bytes before the last.
DRAIN_POLL = 0.005


class UpstreamClient:
    """One request at a time to one upstream address, on a kept-alive connection.

    A kept-alive connection the upstream closed meanwhile (an idle timeout) is
    replaced once when the request got no byte back, as the front does for pooled
    connections. The upstream may have read the request before closing, so this
    suits callers that deliver at least once (replay).
    """

    __slots__ = ("_conn", "_done", "_error", "_peer", "_response", "keep_body")

    def __init__(self, keep_body: int = 0) -> None:
        self.keep_body = keep_body  # body bytes kept in the response; the rest is dropped
        self._peer: UpstreamPeer | None = None
        self._conn: UpstreamConnection | None = None  # the one in an exchange
        self._done: asyncio.Future[None] | None = None
        self._response: UpstreamResponse | None = None
        self._error = ""

    async def request(
        self,
        host: str,
        port: int,
        data: bytes,
        *,
        head_only: bool,
        timeout: float,
        may_send: Callable[[], bool] | None = None,
    ) -> UpstreamResponse:
        """Send `data` (a whole request) and return the final response; raises UpstreamFailed.

        `timeout` bounds everything: connecting, a replaced connection and the response.
        With `may_send`, each write of the request is decided by it right before it
        (no await between); refused, nothing the upstream could act on went out and
        Withheld is raised."""
        try:
            async with asyncio.timeout(timeout):
                peer = self._peer_for(host, port)
                conn = peer.take_idle()
                if conn is not None:
                    try:
                        return await self._exchange(conn, data, head_only, may_send)
                    except UpstreamFailed:
                        if conn.got_bytes or self._peer is not peer:
                            raise  # an answer began, or close() ended the exchange
                        # Closed by the upstream while idle: the request got no answer at
                        # all, so a fresh connection is not a second attempt.
                conn = await self._connect(peer)
                return await self._exchange(conn, data, head_only, may_send)
        except TimeoutError as exc:
            raise UpstreamFailed(f"no whole response within {timeout:g}s") from exc
        except OSError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Close every connection; an exchange in progress fails at once."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
            self._finish("closed by the caller")
        peer, self._peer = self._peer, None
        if peer is not None:
            peer.close_all()

    def _peer_for(self, host: str, port: int) -> UpstreamPeer:
        peer = self._peer
        if peer is None or peer.host != host or peer.port != port:
            self.close()
            peer = self._peer = UpstreamPeer(host, port, max_idle=1)
        return peer

    async def _connect(self, peer: UpstreamPeer) -> UpstreamConnection:
        peer.reserve()  # no cap here; keeps `open` true, as connection_lost releases it
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: UpstreamConnection(peer), peer.host, peer.port
            )
        except BaseException:
            peer.release()
            raise
        finally:
            peer.connected()
        return conn

    async def _exchange(
        self,
        conn: UpstreamConnection,
        data: bytes,
        head_only: bool,
        may_send: Callable[[], bool] | None,
    ) -> UpstreamResponse:
        self._response = None
        self._error = ""
        self._done = done = asyncio.get_running_loop().create_future()
        self._conn = conn
        conn.owner = self
        conn.head_only = head_only
        try:
            if may_send is None:
                conn.write(data)
            else:
                await self._write_gated(conn, data, may_send, done)
            await done
        finally:
            self._done = None
            self._conn = None
            if conn.owner is self:
                conn.abort()  # timed out or cancelled mid-exchange: never reuse it
        if self._error:
            raise (MalformedResponse if self._error == MALFORMED else UpstreamFailed)(self._error)
        assert self._response is not None
        return self._response

    @staticmethod
    async def _write_gated(
        conn: UpstreamConnection,
        data: bytes,
        may_send: Callable[[], bool],
        done: asyncio.Future[None],
    ) -> None:
        """Write `data` so that its last byte goes out only on `may_send()` asked right
        before, with no await between: an upstream acts on a request once it has all of
        it, so what the loop may still send later, unasked, is only ever the bytes before
        the last one. A refusal raises Withheld (the caller's exchange aborts the
        connection, dropping whatever part of the request it held)."""
        if not may_send():
            raise Withheld
        conn.write(data[:-1])
        # Until the kernel holds every byte before the last and has room for one more,
        # so that the last goes into the kernel in the write that was decided.
        while not done.done() and not conn.writable():
            await asyncio.sleep(DRAIN_POLL)
        if done.done():
            # Answered before the whole request (or the connection failed): the rest is
            # not sent, and a connection holding part of a request is never reused.
            conn.abort()
            return
        if not may_send():
            raise Withheld
        conn.write(data[-1:])
        if conn.unsent():
            # The kernel refused it after all: buffered here, the loop would send it later,
            # undecided. The caller's exchange aborts the connection, dropping it.
            raise UpstreamFailed("the upstream took no more of the request")

    def _finish(self, error: str = "") -> None:
        done = self._done
        if done is not None and not done.done():
            self._error = error
            done.set_result(None)

    # UpstreamOwner callbacks, called by the connection's parser

    def upstream_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: list
    ) -> None:
        self._response = UpstreamResponse(status, reason, headers)

    def upstream_body(self, data: bytes) -> None:
        response = self._response
        if response is not None and len(response.body) < self.keep_body:
            response.body += data[: self.keep_body - len(response.body)]

    def upstream_end(self, conn: UpstreamConnection) -> None:
        conn.owner = None
        if conn.keep_alive():
            conn.peer.give_back(conn, asyncio.get_running_loop().time())
        else:
            conn.abort()
        self._finish()

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.abort()
        if self._response is not None:
            self._response.upgraded = True
        self._finish()

    def upstream_tunnel_data(self, data: bytes) -> None:
        pass  # never: the connection is closed when it upgrades

    def upstream_lost(self, conn: UpstreamConnection, error: str) -> None:
        if error == "bad_response":
            self._finish(MALFORMED)
        elif self._response is None:
            self._finish(f"connection {error} before the response")
        elif error != "closed":
            self._finish(f"connection {error} mid-response")
        else:
            self._finish()  # a close after the head ends a close-delimited body

    def upstream_flush(self) -> None:
        pass  # nothing is buffered: the response is handed over whole

    def pause_client_reading(self) -> None:
        pass  # the whole request is written at once; there is no reader to pause

    def resume_client_reading(self) -> None:
        pass
