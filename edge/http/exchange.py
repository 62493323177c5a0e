"""One request/response through the edge, and the deadline kinds of a client connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from edge.http.forward_headers import RequestFields
    from edge.routing.admission import ColdRequest
    from edge.routing.concurrency_limit import Gate, Ticket
    from edge.upstream.pool import UpstreamConnection, UpstreamPeer
    from wake.store.protocol import WakePhases

    # What admission needs once a request for a cold app becomes current: the request,
    # its fields, origin-form target, normalised host and body framing line.
    ColdPending = tuple[ColdRequest, RequestFields, bytes, bytes, bytes]

# Deadline kinds, checked by the sweeper.
IDLE = 0  # no request in progress: keep-alive timeout
HEADERS = 1  # reading a request head: header timeout (slowloris)
EXCHANGE = 2  # forwarding: upstream response-header or idle timeout
DRAINING = 3  # nothing to enforce


class Exchange:
    """One request/response through the edge."""

    __slots__ = (
        "app",
        "body_buffer",
        "body_buffered",
        "body_chunked",
        "body_done",
        "body_seen",
        "cold",
        "early_tunnel",
        "gate",
        "head",
        "held",
        "hold_timer",
        "html",
        "http10",
        "keep_alive",
        "method",
        "path",
        "peer",
        "queue_key",
        "queue_limit",
        "queue_waiting",
        "request_id",
        "response_chunked",
        "response_eof",
        "response_started",
        "retried",
        "send_continue",
        "started_at",
        "status",
        "ticket",
        "upgrade",
        "upstream",
        "waited_ms",
        "waiter",
        "waiting_head",
        "wake_phases",
    )

    # Of the wake that released a held request: set with `waited_ms` and read only when that
    # is set, so a request that was never held pays nothing for it.
    wake_phases: WakePhases | None

    def __init__(self, method: bytes, started_at: float) -> None:
        self.method = method
        self.path = b""
        self.started_at = started_at
        self.app = ""
        self.head = b""
        self.request_id = b""
        self.http10 = False
        self.keep_alive = True
        self.upgrade = False
        self.body_chunked = False
        self.body_seen = 0
        self.body_done = False
        self.body_buffer: list[bytes] | None = None
        self.body_buffered = 0
        self.early_tunnel = b""
        self.peer: UpstreamPeer | None = None
        # The peer's concurrency gate it holds a slot in, or waits in line at (`ticket`).
        self.gate: Gate | None = None
        self.ticket: Ticket | None = None
        self.upstream: UpstreamConnection | None = None
        self.status = 0
        self.response_started = False
        self.response_chunked = False
        self.response_eof = False
        self.waiting_head = False
        self.send_continue = False
        self.retried = False
        self.held = -1  # body bytes reserved while held or queued; -1 when neither
        # While held for a wake: the timer of its hold timeout (its wake's outcome has a
        # callback for it); None once released, refused, timed out or gone.
        self.hold_timer: asyncio.TimerHandle | None = None
        self.queue_limit = 0  # body limit of a request to be queued; 0: not queued
        self.queue_key = ""
        self.queue_waiting = False
        self.waited_ms = -1.0
        self.html = False
        self.cold: ColdPending | None = None  # admitted only when it becomes current
        self.waiter: Callable[[UpstreamConnection | None], bool] | None = None  # in a peer's line


# What the sweeper does when a connection's deadline has passed.
CLOSE = "close"  # nothing in progress (or a forward with no exchange): close
HEADER_TIMEOUT = "header_timeout"  # 408: the head never arrived whole
BODY_TIMEOUT = "body_timeout"  # 408: a body to queue stalled
EXTEND = "extend"  # a held request: its own bound applies, look again in a second
ABORT = "abort"  # a response in progress stalled: cut it so the client sees it
UPSTREAM_TIMEOUT = "upstream_timeout"  # 504: the upstream did not answer in time
WAIT_TIMEOUT = "concurrency_wait_timeout"  # 503: its turn under the app's limit never came
NOTHING = "nothing"


def deadline_action(kind: int, parsing: bool, ex: Exchange | None) -> str:
    """The sweeper's move for a connection whose `kind` deadline passed."""
    if kind == IDLE:
        return CLOSE if not parsing and ex is None else NOTHING
    if kind == HEADERS:
        return HEADER_TIMEOUT
    if kind != EXCHANGE:
        return NOTHING
    if ex is None:
        return CLOSE
    if ex.queue_waiting:
        return BODY_TIMEOUT
    if ex.ticket is not None:
        # In line under the app's concurrency limit; a turn that just came is carried out
        # on the next loop pass (and sets its own deadline then).
        return EXTEND if ex.ticket.granted else WAIT_TIMEOUT
    if ex.held >= 0 and ex.upstream is None:
        # Held while its app wakes (or being queued): that wait has its own bound
        # (the hold timeout, the store's call timeout), not this one.
        return EXTEND
    return ABORT if ex.response_started else UPSTREAM_TIMEOUT


def body_rate_deadline(began: float, received: int, grace: float, min_rate: float) -> float:
    """When a request body that began at `began` and has `received` bytes since becomes too
    slow: the grace, plus one second per `min_rate` bytes received."""
    return began + grace + received / min_rate
