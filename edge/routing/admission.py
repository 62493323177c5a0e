"""Admission of a request for an app that is not hot: hold it, queue it, or refuse it.

Theory of operation. The front gathers the request's facts (origin-form path and
authority host, whatever form the request line had) and calls `admit` with the app's
policy, the region, the app's expected wake time and the hold accounting. `admit`
decides; the front carries it out (reserve, start the wake, answer). Plain data, no I/O.

Gates (the Wake machine's): "request class safe to hold" (`request_class_safe_to_hold`)
decides hold against reject; "unsafe replay policy exists" is checked when config
loads, and again here (a queue that is not there refuses, never holds). The failure
mode "payment webhook while cold" is reported by its id on the decision (`gallery`)
whenever an unsafe request is refused or queued instead of held.
"""

from __future__ import annotations

import msgspec

from edge.queue.replay_policy import header_key
from edge.routing.classification import RequestClass, RequestFacts, Rule, classify
from edge.routing.hold_accounting import HoldAccounting, HoldCaps
from scheduler_client.models import Region

# A held request's body is buffered up to this much before reading pauses.
HELD_BODY_RESERVE = 65536
REGION_RETRY_AFTER = 60.0
UNSAFE_RETRY_AFTER = 5.0
HOLD_CAP_RETRY_AFTER = 1.0
PAYMENT_WEBHOOK_WHILE_COLD = "payment_webhook_while_cold"


class AppAdmission(msgspec.Struct, frozen=True, kw_only=True):
    """What admission needs of one app, built once per config."""

    name: str
    rules: tuple[Rule, ...] = ()
    hold_timeout: float = 30.0
    starting_page_after: float = 0.0
    caps: HoldCaps = HoldCaps(1000, 8 * 1024 * 1024)
    queue_max_body: int = 0  # 0: the app has no replay policy
    dedupe_key: str = "idempotency-key"


class ColdRequest(msgspec.Struct, frozen=True, kw_only=True):
    facts: RequestFacts
    headers: list[tuple[bytes, bytes]]
    content_length: int | None = None
    chunked: bool = False
    accepts_html: bool = False


class Hold(msgspec.Struct, frozen=True):
    """Hold in memory while the app wakes, `reserve` body bytes counted (more as they arrive)."""

    reserve: int
    starting_page: bool = False
    start_wake: bool = True
    gallery: str = ""


class Queue(msgspec.Struct, frozen=True):
    """Read the whole body (at most `body_limit`), append it to the durable queue."""

    reserve: int
    body_limit: int
    dedupe_key: str
    start_wake: bool = True
    gallery: str = PAYMENT_WEBHOOK_WHILE_COLD


class Reject(msgspec.Struct, frozen=True):
    """Answer at once; `kind` is the X-Edge-Error and the metrics label."""

    status: int
    kind: str
    reason: str
    retry_after: float = 1.0
    start_wake: bool = True
    gallery: str = ""  # the gate or failure mode id it reports, if any


Admission = Hold | Queue | Reject


def admit(
    app: AppAdmission,
    request: ColdRequest,
    region: Region | None,
    expected_wake: float,
    holds: HoldAccounting,
    *,
    queue_available: bool,
) -> Admission:
    """What to do with a request for `app` while it is not hot."""
    if region is not None and region.state != "eligible":
        why = f": {region.reason}" if region.reason else ""
        return Reject(
            503,
            "region_disabled",
            f"region {region.name} is {region.state}{why}; apps are not woken here",
            REGION_RETRY_AFTER,
            start_wake=False,
        )
    request_class = classify(app.rules, request.facts)
    if request_class == "queue":
        return _admit_queued(app, request, holds, queue_available)
    if not request_class_safe_to_hold(request_class):
        # Never held where a crash loses it; the wake still starts for the retry.
        return Reject(
            503,
            "not_safe_to_hold",
            f"app {app.name} is starting; retry (this request is not safe to hold)",
            expected_wake or UNSAFE_RETRY_AFTER,
            gallery=PAYMENT_WEBHOOK_WHILE_COLD,
        )
    if expected_wake > app.hold_timeout:
        return Reject(
            503,
            "wake_slower_than_hold",
            f"app {app.name} is starting and takes about {expected_wake:.0f}s",
            expected_wake,
        )
    # Body bytes are reserved as they arrive (a trickling body pins only what it sent);
    # a declared body that could not fit now is refused at once.
    declared = min(request.content_length or 0, HELD_BODY_RESERVE)
    if not holds.fits(app.name, app.caps, declared):
        return _hold_cap(app)
    return Hold(0, starting_page=request.accepts_html and app.starting_page_after > 0)


def request_class_safe_to_hold(request_class: RequestClass) -> bool:
    """The Wake gate: only requests safe to repeat may wait in memory for a wake."""
    return request_class == "hold"


def _admit_queued(
    app: AppAdmission, request: ColdRequest, holds: HoldAccounting, queue_available: bool
) -> Admission:
    """A request to queue durably: its whole body is read (bounded), then appended."""
    if not app.queue_max_body or not queue_available:
        # Refused at config load; never silently held.
        return Reject(
            503,
            "queue_unavailable",
            f"app {app.name} cannot queue requests here",
            start_wake=False,
        )
    declared = request.content_length or 0
    if declared > app.queue_max_body:
        return Reject(413, "body", "request body too large to queue", start_wake=False)
    if not holds.fits(app.name, app.caps, declared):
        return _hold_cap(app)
    key = header_key(app.dedupe_key, request.headers) or ""
    return Queue(0, app.queue_max_body, key)  # body bytes are reserved as they arrive


def wake_rate_limited(app: AppAdmission, wait: float) -> Reject:
    """The client started its share of wakes: 429, and this request starts none."""
    return Reject(
        429,
        "wake_rate_limited",
        f"app {app.name} is asleep and this client has started too many wakes; retry later",
        max(1.0, wait),
        start_wake=False,
    )


def _hold_cap(app: AppAdmission) -> Reject:
    return Reject(
        503, "hold_cap", f"too many requests held for app {app.name}", HOLD_CAP_RETRY_AFTER
    )


STARTING_PAGE_REFRESH = 2.0
WAKE_ERROR_RETRY_AFTER = 5.0


def hold_wait(app: AppAdmission, waited: float, starting_page: bool) -> float:
    """How much longer a held request may wait for its app: the rest of the hold timeout,
    or of the starting-page delay for a browser that gets one."""
    wait_for = app.hold_timeout - waited
    if starting_page:
        wait_for = min(wait_for, app.starting_page_after)
    return max(0.0, wait_for)


class StartingPage(msgspec.Struct, frozen=True):
    """A browser gets a page that reloads itself every `refresh` seconds (503)."""

    refresh: float = STARTING_PAGE_REFRESH


def after_hold_timeout(
    app: AppAdmission, starting_page: bool, expected_wake: float
) -> StartingPage | Reject:
    """What a request held past its bound gets: the starting page, or 503 hold_timeout."""
    if starting_page:
        return StartingPage()
    return Reject(
        503,
        "hold_timeout",
        f"app {app.name} did not start within the hold timeout",
        expected_wake or app.hold_timeout,
    )


def wake_failed(error: BaseException) -> Reject:
    """The store or control plane failed while a request was held: answer, never hang."""
    return Reject(503, "wake_error", f"wake failed: {type(error).__name__}", WAKE_ERROR_RETRY_AFTER)
