"""One request/response through the edge, and the deadline kinds of a client connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.upstream.pool import UpstreamConnection, UpstreamPeer

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
        "early_tunnel",
        "head",
        "held",
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
        "upgrade",
        "upstream",
        "waited_ms",
        "waiting_head",
    )

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
        self.upstream: UpstreamConnection | None = None
        self.status = 0
        self.response_started = False
        self.response_chunked = False
        self.response_eof = False
        self.waiting_head = False
        self.send_continue = False
        self.retried = False
        self.held = -1  # body bytes reserved while held or queued; -1 when neither
        self.queue_limit = 0  # body limit of a request to be queued; 0: not queued
        self.queue_key = ""
        self.queue_waiting = False
        self.waited_ms = -1.0
        self.html = False
