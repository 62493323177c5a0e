"""The client-facing HTTP/1.1 connection: parse, route, forward, stream back.

Theory of operation. One `FrontConnection` per client socket, parsed by
httptools. Each request becomes an `Exchange`; exchanges run one at a time in
arrival order (pipelined ones wait in `pipeline` with reading paused). On
headers-complete the exchange takes an idle pooled upstream connection and
writes the request head at once; only when no idle connection exists is a task
spawned to connect. Body bytes flow from `on_body` straight to the upstream
transport and response bytes from the upstream parser straight to the client
transport, so nothing is buffered beyond a transport's own high-water mark:
each side pauses the other's reading when its write buffer is full.

A request for an app that is not hot is admitted by `edge.routing.admission.admit`
(hold, queue or refuse); this file only carries the decision out: it reserves in
the worker's hold accounting, starts the wake, and answers or waits, and tells the
wake controller what it did (the gallery's counts). A request released by a wake
gets `Server-Timing` with its own wait and that wake's phases.

An app with `max_concurrency` has a gate on each of its peers: `_forward` asks
`edge.routing.concurrency_limit` whether the request may go or waits its turn, and
`_release_peer`, which every ending passes through, gives its slot or place back.

Timeouts are deadlines stored on the connection and enforced by the worker's
sweeper, so the hot path never arms or cancels a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from edge.http.exchange import (
    ABORT,
    BODY_TIMEOUT,
    CLOSE,
    DRAINING,
    EXCHANGE,
    EXTEND,
    HEADER_TIMEOUT,
    HEADERS,
    IDLE,
    UPSTREAM_TIMEOUT,
    WAIT_TIMEOUT,
    Exchange,
    body_rate_deadline,
    deadline_action,
)
from edge.http.forward_headers import (
    BODY_CHUNKED,
    BODY_EOF,
    BODY_RECHUNKED_EOF,
    RequestFields,
    build_request_head,
    build_response_head,
    error_response,
    queued_response,
    server_timing,
    starting_page,
)
from edge.http.host_pattern import host_from_header
from edge.http.request_head import (
    CHUNKED,
    Refused,
    app_gone,
    body_framing,
    check_head,
    check_upgrade,
    no_route,
    origin_form,
    parse_error_status,
    pipeline_full,
    sends_continue,
    too_many_pipelined,
)
from edge.http.websocket import going_away_frames
from edge.queue.durable_queue import NotReplicated, QueueFull
from edge.queue.replay_policy import body_key
from edge.queue.replica_ack import RETRY_AFTER as REPLICA_ACK_RETRY_AFTER
from edge.queue.replica_ack import ReplicaAck
from edge.routing.admission import (
    ColdRequest,
    Hold,
    Queue,
    Reject,
    admit,
    after_hold_timeout,
    hold_wait,
    wake_failed,
    wake_rate_limited,
)
from edge.routing.classification import facts_from
from edge.routing.client_wake_rate import client_key
from edge.routing.concurrency_limit import (
    Gate,
    Ticket,
    enter,
    give_back,
    pump,
    put_back,
    take,
    wait_bound,
)
from edge.upstream.pool import HEAD_TOO_LARGE, UpstreamConnection, UpstreamPeer
from edge.upstream.retry_policy import retry_elsewhere, retry_on_stale_connection
from wake.controller import HotTarget, WakeRefused
from wake.gallery_tally import Admitted
from wake.store.protocol import StoreUnavailable

if TYPE_CHECKING:
    from edge.http.front_services import FrontServices

logger = logging.getLogger(__name__)
_LINGER_ZERO = struct.pack("ii", 1, 0)
# A request that waited out its bound under an app's concurrency limit: 503, retry after.
WAIT_RETRY_AFTER = 1.0
__all__ = ["DRAINING", "EXCHANGE", "HEADERS", "IDLE", "Exchange", "FrontConnection"]


class FrontConnection(asyncio.Protocol):
    """One client connection; also the owner of whichever upstream serves it."""

    def __init__(self, ctx: FrontServices) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.limits = ctx.limits
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.client_ip_bytes = b""
        self.trusted = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.header_bytes = 0
        self.in_head = False
        self.input_closed = False
        self.body_progress = False
        self.bytes_without_body = 0
        self.parsing: Exchange | None = None
        self.current: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self.out: list[bytes] = []
        self.reading_paused = False
        self.writing_paused = False
        self.closed = False
        self.tunnel: UpstreamConnection | None = None
        self.deadline = 0.0
        self.deadline_kind = IDLE
        # The body being read must keep the minimum rate: checked by the sweeper at
        # `body_check` (0: no body being read), counted from `body_began`/`body_base`.
        self.body_check = 0.0
        self.body_began = 0.0
        self.body_base = 0

    # ---------------------------------------------------------------- lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unix"
        self.client_ip_bytes = self.client_ip.encode()
        self.trusted = self.client_ip in ctx.trusted_proxies
        ctx.connections.add(self)
        ctx.stats.open_connections += 1
        if len(ctx.connections) > self.limits.max_connections or ctx.draining:
            transport.write(error_response(503, "too many connections", close=True, kind="busy"))
            self._close()
            return
        self._set_deadline(IDLE, self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ctx = self.ctx
        if self in ctx.connections:
            ctx.connections.discard(self)
            ctx.stats.open_connections -= 1
        ctx.tunnels.discard(self)
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None and tunnel.transport is not None:
            tunnel.owner = None
            tunnel.transport.close()
        ex = self.current
        if ex is not None:
            self.current = None
            conn = ex.upstream
            if conn is not None:
                # The client is gone: cancel the upstream request, never reuse mid-exchange.
                ex.upstream = None
                conn.abort()
            self._release_peer(ex)
            self._unhold(ex)
            if not ex.response_started or ex.status == 0:
                ex.status = 499
            self._record(ex)
        for queued in self.pipeline:
            self._unhold(queued)
        self.pipeline.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()
        elif self.tunnel is not None:
            self.tunnel.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.closed or self.input_closed:
            return
        parsing = self.parsing
        if parsing is None:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._hold_tunnel_bytes(data[exc.args[0] :])
            return
        except HttpParserCallbackError as exc:
            reject = exc.__context__
            if not isinstance(reject, Refused):
                logger.error("internal error in a request callback: %r", reject)
                reject = Refused(500, "internal error", "internal")
            self._reject(reject)
            return
        except HttpParserError as exc:
            self._reject(Refused(parse_error_status(str(exc)), f"bad request: {exc}", "malformed"))
            return
        if self.in_head:
            if self.head_bytes > self.limits.max_head_bytes:
                self._reject(Refused(431, "request header fields too large", "headers"))
        elif parsing is not None and self.parsing is parsing:
            # Mid-body bytes that carried no body (chunk lines, trailers) are bounded
            # like a head, since httptools buffers a trailer field whole.
            if self.body_progress:
                self.body_progress = False
                self.bytes_without_body = 0
            else:
                self.bytes_without_body += len(data)
                if self.bytes_without_body > self.limits.max_head_bytes:
                    self._reject(Refused(431, "request trailer section too large", "headers"))

    def _hold_tunnel_bytes(self, rest: bytes) -> None:
        """Bytes after an Upgrade request wait until the upstream agrees to switch."""
        ex = self.current or (self.pipeline[-1] if self.pipeline else None)
        if ex is None or not ex.upgrade or not rest:
            return
        ex.early_tunnel += rest
        if len(ex.early_tunnel) > 65536:
            self._pause_reading()

    def eof_received(self) -> bool:
        parsing = self.parsing
        if parsing is not None:
            # Cut off mid-body: it can never complete. Closing now lets connection_lost
            # abort its upstream exchange; one still waiting in line is dropped.
            if parsing is self.current:
                return False
            with contextlib.suppress(ValueError):
                self.pipeline.remove(parsing)
            self.parsing = None
        # Half-closed clients still get the responses to complete requests; close after.
        last = self.pipeline[-1] if self.pipeline else self.current
        if last is None:
            return False
        last.keep_alive = False
        return True

    # ------------------------------------------------------------------ parsing

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.parsing = None
        self.in_head = True
        if self.deadline_kind == IDLE:
            self._set_deadline(HEADERS, self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line:
            raise Refused(414, "request target too long", "url")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parsing is not None:
            return  # trailers of a chunked request body are dropped
        headers = self.headers
        headers.append((name, value))
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.limits.max_header_bytes:
            raise Refused(431, "request header fields too large", "headers")
        if len(headers) > self.limits.max_headers:
            raise Refused(431, "too many request header fields", "headers")

    def on_headers_complete(self) -> None:
        if self.closed:
            return  # answered and closing: nothing more read from this connection is served
        if self.current is not None and pipeline_full(
            len(self.pipeline), self.limits.max_pipelined
        ):
            raise too_many_pipelined()
        parser = self.parser
        now = self.loop.time()
        ex = Exchange(parser.get_method(), now)
        ex.path = self.url
        self.parsing = ex
        self.in_head = False
        self.bytes_without_body = 0
        ex.http10 = parser.get_http_version() == "1.0"
        ex.keep_alive = parser.should_keep_alive() and not self.ctx.draining
        self.head_bytes = 0
        if self.limits.min_body_rate:  # cleared at once by on_message_complete without a body
            self.body_began = now
            self.body_base = 0
            self.body_check = now + self.limits.body_rate_grace
        if self.deadline_kind == HEADERS:
            self._set_deadline(EXCHANGE, self.ctx.upstream_idle_timeout)
        if self.current is None:
            self._prepare(ex)
            self._start(ex)
            return
        try:
            self._prepare(ex)
        except Refused as reject:
            # Answered in order, after the responses ahead of it.
            ex.status = reject.status
            ex.keep_alive = False
            ex.head = error_response(
                reject.status,
                reject.reason,
                close=True,
                kind=reject.kind,
                retry_after=reject.retry_after,
            )
        self.pipeline.append(ex)
        self._pause_reading()

    def on_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.status:
            return
        ex.body_seen += len(data)
        self.body_progress = True
        if ex.body_seen > self.limits.max_body:
            raise Refused(413, "request body too large", "body")
        conn = ex.upstream
        if conn is not None and ex is self.current:
            if ex.body_chunked:
                conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                conn.write(data)
            self.deadline = self.loop.time() + self.ctx.upstream_idle_timeout
        else:
            if ex.body_buffer is None:
                ex.body_buffer = []
            ex.body_buffer.append(data)
            ex.body_buffered += len(data)
            if ex.held >= 0:
                self._hold_bytes(ex, len(data))
            if ex.queue_limit:
                if ex.body_buffered > ex.queue_limit:
                    raise Refused(413, "request body too large to queue", "body")
                if ex is self.current:  # reading it is the exchange: progress extends it
                    self.deadline = self.loop.time() + self.ctx.upstream_idle_timeout
            elif ex.body_buffered > 65536:
                self._pause_reading()

    def on_message_complete(self) -> None:
        self.body_check = 0.0
        ex = self.parsing
        if ex is None:
            return
        ex.body_done = True
        if ex.upstream is not None and ex is self.current and ex.body_chunked:
            ex.upstream.write(b"0\r\n\r\n")
        self.parsing = None
        if ex.queue_waiting:
            ex.queue_waiting = False
            self.loop.create_task(self._queue_then_answer(ex))

    # ----------------------------------------------------------------- routing

    def _prepare(self, ex: Exchange) -> None:
        """Route and build the upstream head; raises Refused for requests the edge refuses."""
        ctx = self.ctx
        method = ex.method
        fields = RequestFields(self.headers, self.trusted, ctx.header_classes)
        check_head(method, fields)
        target, host_value = origin_form(self.url, fields.host)
        found = ctx.route_for(host_value) if host_value is not None else None
        if found is None:
            raise no_route(host_value, self.url[:1] != b"/")
        app, host_value = found
        ex.app = app.name
        framing, ex.body_done = body_framing(fields, self.limits.max_body)
        ex.body_chunked = framing is CHUNKED
        ex.send_continue = sends_continue(fields, ex.http10, ex.body_done)
        ex.upgrade = bool(fields.upgrade) and self.parser.should_upgrade()
        if ex.upgrade:
            check_upgrade(ex.upgrade, ex.body_done)
        ex.request_id = fields.request_id or ctx.next_request_id()
        ex.peer = app.pick()
        if app.wake is not None:
            app.wake.seen(app.name)
            if ex.peer is None:
                # Admitted (a hold slot reserved) only once it is the request being answered.
                request = ColdRequest(
                    facts=facts_from(
                        method, target, host_from_header(host_value) or "", self.headers
                    ),
                    headers=self.headers,
                    content_length=int(fields.content_length) if fields.content_length else None,
                    chunked=fields.chunked,
                    accepts_html=fields.accepts_html,
                )
                ex.cold = (request, fields, target, host_value, framing)
                return
        ex.head = self._upstream_head(ex, fields, target, host_value, framing)

    def _upstream_head(
        self, ex: Exchange, fields: RequestFields, target: bytes, host: bytes, framing: bytes
    ) -> bytes:
        return build_request_head(
            ex.method,
            target,
            fields,
            host=host,
            client_ip=self.client_ip_bytes,
            scheme=self.ctx.scheme,
            request_id=ex.request_id,
            # A queued request never goes upstream from here: it is replayed later
            # with its own Content-Length, whatever framing it came with.
            body=b"" if ex.queue_limit else framing,
            upgrade=ex.upgrade,
        )

    # -------------------------------------------------------------- forwarding

    def _start(self, ex: Exchange) -> None:
        self.current = ex
        if ex.status:  # refused while queued behind a pipelined request
            self.out.append(ex.head)
            self._complete(ex)
            return
        if ex.cold is not None:
            try:
                self._admit_cold(ex)
            except Refused as reject:
                self._refuse_current(ex, reject)
                return
        if ex.send_continue:
            self.out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
        if ex.queue_limit:
            if ex.body_done:
                self.loop.create_task(self._queue_then_answer(ex))
            else:
                ex.queue_waiting = True
            if self.out:
                self.upstream_flush()
            return
        if ex.peer is None:
            self._hold(ex)
            if self.out:
                self.upstream_flush()
            return
        self._forward(ex)

    def _forward(self, ex: Exchange) -> None:
        peer = ex.peer
        peer.in_flight += 1  # type: ignore[union-attr]
        gate = peer.gate  # type: ignore[union-attr]
        if gate is not None:
            ex.gate = gate
            # The hot path's common case asks no clock: `take`, then `enter` if need be.
            if not take(gate) and not self._pass_gate(ex, gate):
                return
        self._acquire_connection(ex)
        if self.out:
            self.upstream_flush()

    def _pass_gate(self, ex: Exchange, gate: Gate) -> bool:
        """Under the app's concurrency limit: True when `ex` took a slot; else it waits in
        line, for what is left of its hold timeout (a wake released it) or the upstream
        response-header timeout, then 503 (see `on_deadline`)."""
        now = self.loop.time()
        ticket = enter(gate, now)
        if ticket is None:
            return True
        ticket.item = partial(self._turn_came, ex, ticket)
        ex.ticket = ticket
        route = self.ctx.apps.get(ex.app)
        hold_timeout = route.admission.hold_timeout if route is not None else 0.0
        released_by_wake = ex.waited_ms >= 0
        wait = wait_bound(
            now, ex.started_at, released_by_wake, hold_timeout, self.ctx.upstream_header_timeout
        )
        self._set_deadline(EXCHANGE, wait)
        self._carry_out(pump(gate, now))  # slots the ramp freed since: the head of the line
        if self.out:
            self.upstream_flush()
        return False

    def _turn_came(self, ex: Exchange, ticket: Ticket) -> None:
        """`ex` may go now: a slot under the app's limit is held for it."""
        if ex.ticket is not ticket:
            return  # it ended meanwhile and gave the slot back then
        ex.ticket = None
        self.ctx.stats.concurrency_wait(ex.app, self.loop.time() - ticket.since)
        if self.current is not ex or self.closed:
            self._release_peer(ex)
            return
        self._set_deadline(EXCHANGE, self.ctx.upstream_idle_timeout)
        self._acquire_connection(ex)
        if self.out:
            self.upstream_flush()

    def _carry_out(self, tickets: list[Ticket]) -> None:
        # On the next loop pass: a slot given back inside an upstream parser callback must
        # not hand that connection over before its parser is done with it.
        if tickets:
            self.loop.call_soon(run_turns, tickets)

    def _leave_gate(self, ex: Exchange, failed: bool) -> None:
        """`ex` ended: give back its slot or its place in line, exactly once."""
        gate, ticket = ex.gate, ex.ticket
        ex.gate = ex.ticket = None
        now = self.loop.time()
        if ticket is not None:
            self.ctx.stats.concurrency_wait(ex.app, now - ticket.since)
        self._carry_out(give_back(gate, ticket, now, failed))  # type: ignore[arg-type]

    def _acquire_connection(self, ex: Exchange) -> None:
        """An idle pooled connection, a new one if the peer has room, else wait in line."""
        peer = ex.peer
        conn = None if ex.upgrade else peer.take_idle()  # type: ignore[union-attr]
        if conn is not None:
            self._send(ex, conn)
        elif peer.reserve():  # type: ignore[union-attr]
            self.loop.create_task(self._connect_then_send(ex, peer))
        else:
            ex.waiter = lambda conn: self._peer_ready(ex, conn)
            peer.wait(ex.waiter)  # type: ignore[union-attr]

    def _peer_ready(self, ex: Exchange, conn: UpstreamConnection | None) -> bool:
        """A connection (or room for a new one) for `ex`; False when `ex` is gone."""
        ex.waiter = None
        if self.current is not ex or self.closed or ex.status:
            return False
        if conn is None:
            self.loop.create_task(self._connect_then_send(ex, ex.peer))
        else:
            self._send(ex, conn)
            if self.out:
                self.upstream_flush()
        return True

    def _admit_cold(self, ex: Exchange) -> None:
        """Carry out what admission decides for a request for an app that was not hot when
        it arrived, now that it is current; raises Refused."""
        request, fields, target, host, framing = ex.cold  # type: ignore[misc]
        ex.cold = None
        ctx = self.ctx
        app = ctx.apps.get(ex.app)
        if app is None:  # a reload removed it while this request waited its turn
            raise app_gone(ex.app)
        ex.peer = app.pick()
        wake = app.wake
        if ex.peer is None and wake is not None:
            decision = admit(
                app.admission,
                request,
                ctx.region(),
                wake.expected_wake(app.name),
                ctx.holds,
                queue_available=ctx.queue is not None,
            )
            if decision.start_wake and not wake.waking(app.name):
                # A new wake: charged to the client that asks for it (joining one is free).
                client = client_key(self.client_ip, self.trusted, fields.xff)
                wait = ctx.wake_allowance.take(client, self.loop.time())
                if wait > 0:
                    decision = wake_rate_limited(app.admission, wait)
                else:
                    refused = isinstance(decision, Reject)
                    ctx.stats.wake_start("refused_request" if refused else "admitted_request")
            if decision.start_wake:
                wake.request_wake(app.name)
            if isinstance(decision, Hold):
                wake.admitted(Admitted.HELD)
            elif isinstance(decision, Reject) and decision.gallery:
                wake.admitted(Admitted.REJECTED)  # a queued one counts once the queue answers
            if isinstance(decision, Reject):
                if decision.status == 413:
                    ctx.stats.queue_event(app.name, "too_large")
                else:
                    ctx.stats.rejection(app.name, decision.kind)
                raise Refused(decision.status, decision.reason, decision.kind, decision.retry_after)
            ctx.holds.reserve(app.name, decision.reserve)
            ex.held = decision.reserve
            if ex.body_buffered:
                self._hold_bytes(ex, ex.body_buffered)
            if isinstance(decision, Queue):
                ex.queue_limit = decision.body_limit
                ex.queue_key = decision.dedupe_key
                if ex.body_buffered > ex.queue_limit:
                    raise Refused(413, "request body too large to queue", "body")
            else:
                ex.html = decision.starting_page
        elif ex.peer is None:
            raise Refused(503, f"app {ex.app} has no upstream", "no_upstream")
        ex.head = self._upstream_head(ex, fields, target, host, framing)

    def _refuse_gone(self, ex: Exchange) -> None:
        if self.current is ex and not self.closed:
            self._refuse_current(ex, app_gone(ex.app))

    def _refuse_current(self, ex: Exchange, reject: Refused) -> None:
        """Answer the current request with the edge's own refusal; what it reserved goes back."""
        self._unhold(ex)
        ex.status = reject.status
        ex.keep_alive = ex.keep_alive and ex.body_done
        self.out.append(
            error_response(
                reject.status,
                reject.reason,
                close=not ex.keep_alive,
                kind=reject.kind,
                retry_after=reject.retry_after,
            )
        )
        self._complete(ex)

    def _hold_bytes(self, ex: Exchange, more: int) -> None:
        """Count body bytes of a held or queued request as they arrive; raises Refused when
        they do not fit the app's or the worker's held-body cap."""
        route = self.ctx.apps.get(ex.app)
        if route is None or not self.ctx.holds.grow(ex.app, route.admission.caps, more):
            self.ctx.stats.rejection(ex.app, "hold_cap")
            raise Refused(503, f"too many request bytes held for app {ex.app}", "hold_cap")
        ex.held += more

    def _unhold(self, ex: Exchange) -> None:
        """What `ex` reserved while held or queued goes back; a hold in progress ends."""
        if ex.held >= 0:
            self.ctx.holds.release(ex.app, ex.held)
            ex.held = -1
        timer = ex.hold_timer
        if timer is not None:
            ex.hold_timer = None
            timer.cancel()

    def _hold(self, ex: Exchange) -> None:
        """Hold `ex` until its app is hot, bounded by its hold timeout: a place in the
        worker's release line and a timer, no task (edge/http/release_line.py)."""
        app = self.ctx.apps.get(ex.app)
        if app is None or app.wake is None:  # a reload removed it (or made it static) meanwhile
            self._unhold(ex)
            self._refuse_gone(ex)
            return
        outcome = app.wake.hot_or_outcome(ex.app)
        if isinstance(outcome, HotTarget):  # hot since it was admitted
            self._unhold(ex)
            self._release(ex, outcome)
            return
        wait_for = hold_wait(app.admission, self.loop.time() - ex.started_at, ex.html)
        ex.hold_timer = self.loop.call_later(wait_for, self._hold_timed_out, ex)
        self.ctx.releases.hold(outcome, self, ex)

    def hold_ended(self, ex: Exchange, outcome: asyncio.Future[HotTarget]) -> None:
        """The wake `ex` is held for ended (the release line calls this while `ex` is still
        held): forward it, or answer why not."""
        self._unhold(ex)
        # Cancelled: the worker is shutting down; answered like a failed wake.
        error = asyncio.CancelledError() if outcome.cancelled() else outcome.exception()
        if isinstance(error, WakeRefused):
            self._refuse_held(ex, error.reason, error.kind, error.retry_after)
        elif error is not None:  # the store or control plane failed: answer, never hang
            failed = wake_failed(error)
            self._refuse_held(ex, failed.reason, failed.kind, failed.retry_after)
        else:
            self._release(ex, outcome.result())

    def _hold_timed_out(self, ex: Exchange) -> None:
        """`ex` waited out its hold timeout: 503 + Retry-After, or a browser's starting page."""
        ex.hold_timer = None
        self._unhold(ex)
        app = self.ctx.apps.get(ex.app)
        if app is None:  # a reload removed it while the request was held
            self._refuse_gone(ex)
            return
        expected = app.wake.expected_wake(ex.app) if app.wake is not None else 0.0
        outcome = after_hold_timeout(app.admission, ex.html, expected)
        if isinstance(outcome, Reject):
            self._refuse_held(ex, outcome.reason, outcome.kind, outcome.retry_after)
        elif self.current is ex and not self.closed:
            ex.status = 503
            ex.keep_alive = ex.keep_alive and ex.body_done
            self.ctx.stats.rejection(ex.app, "starting_page")
            self.out.append(starting_page(ex.app, outcome.refresh))
            self._complete(ex)

    def _release(self, ex: Exchange, target: HotTarget) -> None:
        """`ex` was held and its app is hot: forward it to the allocation the wake made hot."""
        if self.current is not ex or self.closed:
            return
        route = self.ctx.apps.get(ex.app)
        if route is None:  # a reload removed the app while the request was held
            self._refuse_gone(ex)
            return
        ex.waited_ms = (self.loop.time() - ex.started_at) * 1000
        ex.wake_phases = target.phases
        ex.peer = route.peer_for(target.address, target.allocation_id)
        self._forward(ex)

    async def _queue_then_answer(self, ex: Exchange) -> None:
        """Append the whole request to the app's durable queue; 202 only once Redis has it."""
        ctx = self.ctx
        route = ctx.apps.get(ex.app)
        policy = route.spec.replay if route is not None else None
        body = b"".join(ex.body_buffer or ())
        ex.body_buffer = None
        ex.body_buffered = 0
        store = ctx.config.store  # as last reloaded
        try:
            if policy is None or ctx.queue is None:
                raise StoreUnavailable("no queue for this app after a reload")
            result = await ctx.queue.enqueue(
                ex.app,
                method=ex.method,
                path=ex.path,
                head=ex.head,
                body=body,
                key=ex.queue_key
                or body_key(ex.method, ex.path, body, ex.head, policy.identity_headers),
                arrived=time.time(),
                retention=float(policy.retention),
                max_queued=policy.max_queued,
                ack=ReplicaAck(store.min_replicas_acked, float(store.replica_ack_timeout)),
            )
        except QueueFull as exc:
            self._unhold(ex)
            self._queue_answered(Admitted.REJECTED)
            ctx.stats.queue_event(ex.app, "refused_full")
            self._refuse_held(ex, str(exc), "queue_full", 30.0)
            return
        except NotReplicated as exc:
            # Queued on the master all the same: it may be delivered, and a resend with
            # the same dedupe key maps to it (answered 202 once a replica has it).
            self._unhold(ex)
            self._queue_answered(Admitted.REJECTED)
            ctx.stats.queue_event(ex.app, "replica_ack_timeout")
            logger.debug("%s (queued id %s)", exc, exc.entry_id or "none")
            self._refuse_held(ex, str(exc), "queue_unavailable", REPLICA_ACK_RETRY_AFTER)
            return
        except Exception as exc:  # StoreUnavailable, or a store client's bug: answer, never hang
            if not isinstance(exc, StoreUnavailable):
                logger.exception("app %s: enqueue failed unexpectedly", ex.app)
            self._unhold(ex)
            self._queue_answered(Admitted.REJECTED)
            ctx.stats.queue_event(ex.app, "refused_unavailable")
            reason = f"app {ex.app} is starting and its queue is unavailable"
            self._refuse_held(ex, reason, "queue_unavailable", 5.0)
            return
        self._unhold(ex)
        self._queue_answered(Admitted.QUEUED)
        ctx.stats.queue_event(ex.app, "dedupe_hit" if result.duplicate else "accepted")
        if ctx.replayer is not None:
            ctx.replayer.poke()
        if self.current is not ex or self.closed:
            return  # queued all the same; a resend gets the same id
        ex.status = 202
        self.out.append(
            queued_response(ex.app, result.id, result.duplicate, close=not ex.keep_alive)
        )
        self._complete(ex)

    def _queue_answered(self, admitted: Admitted) -> None:
        """A request not safe to hold was queued or refused by the queue: for the gallery."""
        if self.ctx.wake is not None:
            self.ctx.wake.admitted(admitted)

    def _retry_elsewhere(self, ex: Exchange) -> bool:
        """Once per request: an idempotent request whose response had not started moves to
        another ready allocation of its app."""
        if not retry_elsewhere(ex.method, ex.body_done, ex.body_seen, ex.retried):
            return False
        route = self.ctx.apps.get(ex.app)
        failed = ex.peer
        if route is None or failed is None or self.current is not ex or self.closed:
            return False
        other = route.pick_other(failed)
        if other is None:
            return False
        ex.retried = True
        self._release_peer(ex, failed=True)
        ex.peer = other
        self.ctx.stats.upstream_error(ex.app, "retried_elsewhere")
        self._forward(ex)
        return True

    def _refuse_held(self, ex: Exchange, reason: str, kind: str, retry_after: float) -> None:
        if self.current is not ex or self.closed:
            return
        ex.status = 503
        ex.keep_alive = ex.keep_alive and ex.body_done
        self.ctx.stats.rejection(ex.app, kind)
        self.out.append(
            error_response(503, reason, close=not ex.keep_alive, kind=kind, retry_after=retry_after)
        )
        self._complete(ex)

    async def _connect_then_send(self, ex: Exchange, peer: UpstreamPeer) -> None:
        """Open a connection in the room reserved at `peer` (the exchange's peer when the
        room was reserved: the exchange may have ended and let go of it since)."""
        if self.current is not ex or self.closed:
            peer.connected()  # refused or gone before the connect began: give the room back
            peer.release()
            return
        try:
            conn = await self.ctx.pool.connect(peer)
        except TimeoutError:
            peer.release()
            self._upstream_failed(ex, 504, "upstream connect timeout", "connect_timeout")
            return
        except OSError as exc:
            peer.release()
            route = self.ctx.apps.get(ex.app)
            if route is not None and route.wake is not None:
                # The allocation is gone: the next request re-reads the wake state.
                route.wake.forget_hot(ex.app, peer.address)
            if self._retry_elsewhere(ex):
                return
            reason = f"upstream connect failed: {exc.strerror or exc}"
            self._upstream_failed(ex, 502, reason, "connect_failed")
            return
        if self.current is not ex or self.closed:
            conn.abort()
            return
        self._send(ex, conn)
        if self.out:
            self.upstream_flush()

    def _send(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.upstream = conn
        conn.owner = self
        conn.head_only = ex.method == b"HEAD"
        buffered = ex.body_buffer
        if buffered and not ex.body_chunked:
            conn.write(ex.head + b"".join(buffered))
        elif buffered:
            conn.write(ex.head + b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in buffered))
        else:
            conn.write(ex.head)
        if buffered:
            ex.body_buffer = None
            ex.body_buffered = 0
            self._resume_reading()
        if ex.body_done and ex.body_chunked:
            conn.write(b"0\r\n\r\n")
        ex.waiting_head = True
        self._set_deadline(EXCHANGE, self.ctx.upstream_header_timeout)
        if self.writing_paused:
            conn.pause_reading()

    # UpstreamOwner callbacks

    def upstream_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: list
    ) -> None:
        ex = self.current
        if ex is None or ex.upstream is not conn:
            return
        if status == 101 and not ex.upgrade:
            conn.abort()
            self._upstream_failed(ex, 502, "upstream switched protocols unasked", "bad_response")
            return
        ex.status = status
        ex.waiting_head = False
        self.deadline = self.loop.time() + self.ctx.upstream_idle_timeout
        upgrade = status == 101
        if ex.upgrade and not upgrade:
            ex.keep_alive = False  # the parser is past the head; the connection can't continue
        ex.response_started = True
        head, mode = build_response_head(
            status,
            reason,
            headers,
            head_request=ex.method == b"HEAD",
            keep_alive=ex.keep_alive,
            http10_client=ex.http10,
            upgrade=upgrade,
        )
        if ex.waited_ms >= 0:
            head = head[:-2] + server_timing(ex.waited_ms, ex.wake_phases) + b"\r\n"
        self.out.append(head)
        if mode == BODY_CHUNKED:
            ex.response_chunked = True
        elif mode == BODY_RECHUNKED_EOF:
            ex.response_chunked = True
            ex.response_eof = True
        elif mode == BODY_EOF:
            ex.keep_alive = False
            ex.response_eof = True

    def upstream_body(self, data: bytes) -> None:
        ex = self.current
        if ex is None:
            return
        if ex.response_chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)

    def upstream_end(self, conn: UpstreamConnection) -> None:
        ex = self.current
        if ex is None or ex.upstream is not conn:
            return
        if ex.response_chunked:
            self.out.append(b"0\r\n\r\n")
        ex.upstream = None
        # After an Upgrade request the connection's framing is unknown: never reuse it.
        if ex.body_done and not ex.upgrade and conn.keep_alive():
            ex.peer.give_back(conn, self.loop.time())  # type: ignore[union-attr]
        else:
            conn.abort()
        self._complete(ex)

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        ex = self.current
        if ex is None or ex.upstream is not conn:
            conn.abort()
            return
        ex.upstream = None
        if ex.early_tunnel:
            conn.write(ex.early_tunnel)
            ex.early_tunnel = b""
            self._resume_reading()
        self._release_peer(ex)
        self._record(ex)
        self.current = None
        self.tunnel = conn
        self.ctx.tunnels.add(self)
        self.deadline_kind = DRAINING
        if rest:
            self.out.append(rest)

    def upstream_tunnel_data(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def upstream_lost(self, conn: UpstreamConnection, error: str) -> None:
        if self.tunnel is conn:
            self.tunnel = None
            self._close()
            return
        ex = self.current
        if ex is None or ex.upstream is not conn:
            return
        ex.upstream = None
        if ex.response_eof and ex.response_started and error == "closed":
            if ex.response_chunked:
                self.out.append(b"0\r\n\r\n")
            self._complete(ex)  # close-delimited body ended
            return
        if ex.response_started:
            self.ctx.stats.upstream_error(ex.app, "reset_mid_response")
            self._release_peer(ex)
            self._record(ex)
            self.current = None
            self.upstream_flush()
            self._close(abort=True)
            return
        if retry_on_stale_connection(
            ex.method, ex.body_done, ex.body_seen, conn.reused, conn.got_bytes
        ):
            self._acquire_connection(ex)
            return
        if not conn.got_bytes and self._retry_elsewhere(ex):
            return
        reason = "upstream response head too large" if error == HEAD_TOO_LARGE else ""
        self._upstream_failed(ex, 502, reason or f"upstream connection {error}", error)

    def upstream_flush(self) -> None:
        ex = self.current
        if ex is not None and ex.response_started:
            self.deadline = self.loop.time() + self.ctx.upstream_idle_timeout
        out = self.out
        if out and not self.closed:
            if len(out) == 1:
                self.transport.write(out[0])  # type: ignore[union-attr]
            else:
                self.transport.write(b"".join(out))  # type: ignore[union-attr]
            out.clear()
        elif out:
            out.clear()

    def pause_client_reading(self) -> None:
        self._pause_reading()

    def resume_client_reading(self) -> None:
        self._resume_reading()

    # ---------------------------------------------------------------- endings

    def _complete(self, ex: Exchange) -> None:
        if ex.held >= 0:  # every ending gives back what a held or queued request reserved
            self._unhold(ex)
        self._release_peer(ex)
        self._record(ex)
        self.current = None
        self.upstream_flush()
        if not ex.keep_alive or not ex.body_done:
            self._close()
            return
        if self.in_head:
            self._set_deadline(HEADERS, self.limits.header_timeout)
        else:
            self._set_deadline(IDLE, self.limits.keepalive_timeout)
        if self.pipeline:
            self.loop.call_soon(self._next)
        else:
            self._resume_reading()

    def _next(self) -> None:
        if self.closed or self.current is not None or not self.pipeline:
            return
        ex = self.pipeline.popleft()
        if not self.pipeline:
            self._resume_reading()
        self._set_deadline(EXCHANGE, self.ctx.upstream_idle_timeout)
        self._start(ex)

    def _upstream_failed(self, ex: Exchange, status: int, reason: str, kind: str) -> None:
        if self.current is not ex or self.closed:
            return
        self.ctx.stats.upstream_error(ex.app, kind)
        ex.upstream = None
        ex.status = status
        ex.keep_alive = ex.keep_alive and ex.body_done
        self.out.append(error_response(status, reason, close=not ex.keep_alive, kind=kind))
        self._complete(ex)

    def _release_peer(self, ex: Exchange, failed: bool = False) -> None:
        """Every ending of an exchange that was given a peer comes here (once it has one)."""
        peer = ex.peer
        if peer is not None:
            peer.in_flight -= 1
            ex.peer = None
            if ex.waiter is not None:  # gave up waiting for a connection: leave the line
                peer.unwait(ex.waiter)
                ex.waiter = None
            gate = ex.gate
            if gate is not None:
                if ex.ticket is None and put_back(gate):  # the common ending: no clock
                    ex.gate = None
                else:
                    self._leave_gate(ex, failed or ex.status >= 500)

    def _record(self, ex: Exchange) -> None:
        ctx = self.ctx
        elapsed = self.loop.time() - ex.started_at
        ctx.stats.record(ex.app or "-", ex.status, elapsed)
        if ctx.access_log is not None and (
            ctx.access_log_sample >= 1.0 or random.random() < ctx.access_log_sample
        ):
            ctx.access_log.write(ex, self.client_ip, elapsed)

    def _reject(self, reject: Refused) -> None:
        """Refuse the request being parsed; input stops and the connection closes after it.

        With a response already in progress, the refusal waits its turn in the
        pipeline so every earlier request still gets its own answer, in order.
        """
        ex = self.parsing
        self.parsing = None
        self.in_head = False
        self.input_closed = True
        refusal = error_response(
            reject.status,
            reject.reason,
            close=True,
            kind=reject.kind,
            retry_after=reject.retry_after,
        )
        current = self.current
        if current is not None and ex is current:
            if current.response_started:
                self._close(abort=True)
                return
            conn, current.upstream = current.upstream, None
            if conn is not None:
                conn.abort()
            current.status = reject.status
            current.keep_alive = False
            current.queue_waiting = False
            self._unhold(current)
            self.out.append(refusal)
            self._complete(current)
            return
        if ex is None:
            ex = Exchange(b"", self.loop.time())
        ex.status = reject.status
        ex.keep_alive = False
        ex.head = refusal
        if current is None:
            self._record(ex)
            self.out.append(refusal)
            self.upstream_flush()
            self._close()
            return
        if ex not in self.pipeline:
            self.pipeline.append(ex)
        self._pause_reading()

    def _close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline_kind = DRAINING
        if self.transport is not None:
            if abort:
                # A reset, not a FIN: a close-delimited body would otherwise look complete.
                sock = self.transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                self.transport.abort()
            else:
                self.transport.close()

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    # --------------------------------------------------------------- deadlines

    def _set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.loop.time() + seconds

    def on_deadline(self, now: float) -> None:
        """Called by the sweeper once `deadline` has passed."""
        ex = self.current
        action = deadline_action(self.deadline_kind, self.parsing is not None, ex)
        if action == CLOSE:
            self._close()
        elif action == HEADER_TIMEOUT:
            self._reject(Refused(408, "timed out reading the request head", "header_timeout"))
        elif action == BODY_TIMEOUT:
            self._reject(Refused(408, "timed out reading the request body", "body_timeout"))
        elif action == EXTEND:
            self.deadline = now + 1.0
        elif action == ABORT:
            self.ctx.stats.upstream_error(ex.app, "idle_timeout")  # type: ignore[union-attr]
            self._close(abort=True)
        elif action == WAIT_TIMEOUT:
            reason = f"app {ex.app} is at its concurrency limit; retry"  # type: ignore[union-attr]
            self._refuse_held(ex, reason, WAIT_TIMEOUT, WAIT_RETRY_AFTER)  # type: ignore[arg-type]
        elif action == UPSTREAM_TIMEOUT:
            conn, ex.upstream = ex.upstream, None  # type: ignore[union-attr]
            if conn is not None:
                conn.abort()
            kind_name = "response_header_timeout" if ex.waiting_head else "idle_timeout"  # type: ignore[union-attr]
            self._upstream_failed(ex, 504, f"upstream {kind_name.replace('_', ' ')}", kind_name)  # type: ignore[arg-type]

    def on_body_check(self, now: float) -> None:
        """Called by the sweeper once `body_check` has passed: is the body still fast enough?"""
        ex = self.parsing
        if ex is None or self.closed:
            self.body_check = 0.0
            return
        if self.reading_paused:
            # The edge stopped reading, not the client: the clock starts again.
            self.body_began = now
            self.body_base = ex.body_seen
            self.body_check = now + self.limits.body_rate_grace
            return
        limits = self.limits
        due = body_rate_deadline(
            self.body_began,
            ex.body_seen - self.body_base,
            limits.body_rate_grace,
            limits.min_body_rate,
        )
        if now < due:
            self.body_check = due
            return
        self.body_check = 0.0
        self._reject(Refused(408, "request body arrived too slowly", "body_rate"))

    def close_tunnel_going_away(self) -> None:
        """The allocation behind this tunnel reached its drain deadline: WebSocket 1001 both
        ways (the server-to-client frame unmasked, the client-to-server one masked)."""
        tunnel = self.tunnel
        if tunnel is None or self.closed:
            return
        to_client, to_upstream = going_away_frames()
        self.transport.write(to_client)  # type: ignore[union-attr]
        tunnel.write(to_upstream)
        self.tunnel = None
        tunnel.owner = None
        if tunnel.transport is not None:
            tunnel.transport.close()
        self._close()

    def drain(self) -> None:
        """Shutdown: close when idle, otherwise after the response in progress."""
        if self.current is None and self.parsing is None and not self.pipeline:
            self._close()
        elif self.current is not None:
            self.current.keep_alive = False


def run_turns(tickets: list[Ticket]) -> None:
    """Carry out requests whose turn came under an app's concurrency limit."""
    for ticket in tickets:
        ticket.item()  # type: ignore[misc]
