"""What a client connection needs from its worker: the narrow interface the front is given.

The worker context implements it; the front never sees the rest of the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableSet
from typing import Protocol

from edge.http.access_log import AccessLog
from edge.http.forward_headers import HeaderClasses, TrustedProxies
from edge.http.release_line import ReleaseLine
from edge.ops.worker_stats import WorkerStats
from edge.queue.durable_queue import DurableQueue
from edge.routing.app_upstreams import AppUpstreams
from edge.routing.client_wake_rate import ClientWakeAllowance
from edge.routing.hold_accounting import HoldAccounting
from edge.server.config import LimitsSection
from edge.upstream.pool import UpstreamPool
from scheduler_client.models import Region


class FrontLimits:
    """Client-side limits, copied out of config for attribute-speed access."""

    __slots__ = (
        "body_rate_grace",
        "header_timeout",
        "keepalive_timeout",
        "max_body",
        "max_connections",
        "max_head_bytes",
        "max_header_bytes",
        "max_headers",
        "max_pipelined",
        "max_request_line",
        "min_body_rate",
    )

    def __init__(self, limits: LimitsSection) -> None:
        self.max_request_line = int(limits.max_request_line)
        self.max_headers = limits.max_headers
        self.max_header_bytes = int(limits.max_header_bytes)
        self.max_body = int(limits.max_body)
        self.header_timeout = float(limits.header_timeout)
        self.keepalive_timeout = float(limits.keepalive_timeout)
        self.max_connections = limits.max_connections
        self.max_pipelined = limits.max_pipelined
        self.min_body_rate = float(limits.min_body_rate)
        self.body_rate_grace = float(limits.body_rate_grace)
        # The request line counts toward the head too.
        self.max_head_bytes = int(limits.max_request_line) + int(limits.max_header_bytes)


class ReplayNudge(Protocol):
    def poke(self) -> None: ...


class FrontServices(Protocol):
    """Shared by every client connection of one worker."""

    loop: asyncio.AbstractEventLoop
    limits: FrontLimits
    trusted_proxies: TrustedProxies
    header_classes: HeaderClasses
    scheme: bytes
    draining: bool
    stats: WorkerStats
    pool: UpstreamPool
    holds: HoldAccounting
    releases: ReleaseLine
    wake_allowance: ClientWakeAllowance
    apps: dict[str, AppUpstreams]
    connections: MutableSet[asyncio.Protocol]
    tunnels: MutableSet[asyncio.Protocol]
    upstream_header_timeout: float
    upstream_idle_timeout: float
    access_log: AccessLog | None
    access_log_sample: float
    queue: DurableQueue | None  # set when an app can queue
    replayer: ReplayNudge | None

    def route_for(self, host_value: bytes) -> tuple[AppUpstreams, bytes] | None:
        """The app serving a raw Host value, and the normalised host to forward."""
        ...

    def next_request_id(self) -> bytes: ...

    def region(self) -> Region | None:
        """The region's state as last followed; None without a control plane."""
        ...
