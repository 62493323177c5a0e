"""The front's own decisions as plain functions: request head checks, the origin form of
a target, body framing, Expect, retries, deadlines, holds, WebSocket close frames."""

from __future__ import annotations

import pytest

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
    NOTHING,
    UPSTREAM_TIMEOUT,
    WAIT_TIMEOUT,
    Exchange,
    body_rate_deadline,
    deadline_action,
)
from edge.http.forward_headers import RequestFields
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
from edge.routing.admission import (
    AppAdmission,
    Reject,
    StartingPage,
    after_hold_timeout,
    hold_wait,
    wake_failed,
)
from edge.routing.concurrency_limit import Ticket
from edge.upstream.retry_policy import replayable, retry_elsewhere, retry_on_stale_connection


def fields(*headers: tuple[bytes, bytes]) -> RequestFields:
    return RequestFields(list(headers), False)


def refused(call, *args) -> Refused:
    with pytest.raises(Refused) as info:
        call(*args)
    return info.value


def test_head_checks_refuse_connect_two_hosts_and_unknown_codings() -> None:
    assert refused(check_head, b"CONNECT", fields((b"Host", b"a"))).status == 400
    two = fields((b"Host", b"a"), (b"Host", b"b"))
    assert refused(check_head, b"GET", two).kind == "host"
    gzip = fields((b"Host", b"a"), (b"Transfer-Encoding", b"gzip"))
    assert refused(check_head, b"POST", gzip).status == 501
    check_head(b"POST", fields((b"Host", b"a"), (b"Transfer-Encoding", b"chunked")))


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        (b"/a?b", b"h", (b"/a?b", b"h")),
        (b"*", b"h", (b"*", b"h")),
        (b"http://shop.example.com/webhooks/x", b"other", (b"/webhooks/x", b"shop.example.com")),
        (b"HTTPS://shop:8443?q=1", None, (b"/?q=1", b"shop:8443")),
        (b"http://shop", None, (b"/", b"shop")),
    ],
)
def test_origin_form_of_a_target(target: bytes, host: bytes | None, expected) -> None:
    assert origin_form(target, host) == expected


@pytest.mark.parametrize("target", [b"ftp://x/", b"http://user@x/", b"http:///path", b"x"])
def test_bad_targets_are_400(target: bytes) -> None:
    assert refused(origin_form, target, b"h").kind == "target"


def test_no_route_says_why() -> None:
    assert no_route(None, False).reason == "missing Host header"
    assert no_route(b"x.example", True).kind == "host"
    assert no_route(b"bad host", False).kind == "host"
    missing = no_route(b"unknown.example", False)
    assert (missing.status, missing.kind) == (404, "no_route")


def test_body_framing() -> None:
    assert body_framing(fields((b"Content-Length", b"5")), 10) == (b"Content-Length: 5", False)
    assert body_framing(fields((b"Content-Length", b"0")), 10) == (b"Content-Length: 0", True)
    framing, done = body_framing(fields((b"Transfer-Encoding", b"chunked")), 10)
    assert framing is CHUNKED and not done
    assert body_framing(fields(), 10) == (b"", True)
    assert refused(body_framing, fields((b"Content-Length", b"11")), 10).status == 413


def test_expect_100_continue_is_answered_by_the_edge() -> None:
    expect = fields((b"Expect", b"100-Continue"))
    assert sends_continue(expect, http10=False, body_done=False)
    assert not sends_continue(expect, http10=True, body_done=False)
    assert not sends_continue(expect, http10=False, body_done=True)
    assert not sends_continue(fields(), http10=False, body_done=False)
    assert refused(sends_continue, fields((b"Expect", b"x")), False, False).status == 417


def test_parse_error_status() -> None:
    assert parse_error_status("HPE_HEADER_OVERFLOW: header overflow") == 431
    assert parse_error_status("invalid method") == 400


def test_retries_only_for_idempotent_requests_without_a_body() -> None:
    assert replayable(b"GET", True, 0) and replayable(b"DELETE", True, 0)
    assert not replayable(b"POST", True, 0)
    assert not replayable(b"PUT", True, 3)  # body bytes were consumed
    assert not replayable(b"GET", False, 0)  # body still arriving
    assert retry_on_stale_connection(b"GET", True, 0, reused=True, got_bytes=False)
    assert not retry_on_stale_connection(b"GET", True, 0, reused=False, got_bytes=False)
    assert not retry_on_stale_connection(b"GET", True, 0, reused=True, got_bytes=True)
    assert retry_elsewhere(b"GET", True, 0, retried=False)
    assert not retry_elsewhere(b"GET", True, 0, retried=True)


def exchange(**state) -> Exchange:
    ex = Exchange(b"GET", 0.0)
    for name, value in state.items():
        setattr(ex, name, value)
    return ex


def test_deadline_actions() -> None:
    assert deadline_action(IDLE, False, None) == CLOSE
    assert deadline_action(IDLE, True, None) == NOTHING  # a head started: its own deadline
    assert deadline_action(HEADERS, True, None) == HEADER_TIMEOUT
    assert deadline_action(DRAINING, False, None) == NOTHING
    assert deadline_action(EXCHANGE, False, None) == CLOSE
    assert deadline_action(EXCHANGE, True, exchange(queue_waiting=True)) == BODY_TIMEOUT
    assert deadline_action(EXCHANGE, False, exchange(held=0)) == EXTEND
    assert deadline_action(EXCHANGE, False, exchange(response_started=True)) == ABORT
    assert deadline_action(EXCHANGE, False, exchange(waiting_head=True)) == UPSTREAM_TIMEOUT


def test_a_request_waiting_under_a_concurrency_limit_times_out_unless_its_turn_came() -> None:
    waiting = Ticket(0.0)
    assert deadline_action(EXCHANGE, False, exchange(ticket=waiting)) == WAIT_TIMEOUT
    # Held and released by a wake, then in line: the line's bound applies, not the hold's.
    assert deadline_action(EXCHANGE, False, exchange(ticket=waiting, held=0)) == WAIT_TIMEOUT
    waiting.granted = True  # carried out on the next loop pass, which sets a new deadline
    assert deadline_action(EXCHANGE, False, exchange(ticket=waiting)) == EXTEND


def test_hold_wait_and_what_follows_a_hold_timeout() -> None:
    app = AppAdmission(name="shop", hold_timeout=10.0, starting_page_after=2.0)
    assert hold_wait(app, 3.0, starting_page=False) == 7.0
    assert hold_wait(app, 3.0, starting_page=True) == 2.0
    assert hold_wait(app, 12.0, starting_page=False) == 0.0
    assert after_hold_timeout(app, True, 0.0) == StartingPage(2.0)
    timed_out = after_hold_timeout(app, False, 0.0)
    assert isinstance(timed_out, Reject) and timed_out.kind == "hold_timeout"
    assert timed_out.retry_after == 10.0
    assert after_hold_timeout(app, False, 4.0).retry_after == 4.0
    failed = wake_failed(ConnectionError("x"))
    assert (failed.status, failed.kind, failed.reason) == (
        503,
        "wake_error",
        "wake failed: ConnectionError",
    )


def test_going_away_frames() -> None:
    to_client, to_upstream = going_away_frames(b"\x01\x02\x03\x04")
    assert to_client == b"\x88\x02\x03\xe9"  # close, unmasked, status 1001
    assert to_upstream[:6] == b"\x88\x82\x01\x02\x03\x04"  # close, masked
    assert bytes(b ^ m for b, m in zip(to_upstream[6:], b"\x01\x02", strict=True)) == b"\x03\xe9"


def test_pipeline_cap_counts_the_requests_waiting_behind_the_current_one() -> None:
    assert not pipeline_full(0, 16)
    assert not pipeline_full(15, 16)
    assert pipeline_full(16, 16)
    assert pipeline_full(1, 1)
    refusal = too_many_pipelined()
    assert (refusal.status, refusal.kind) == (503, "pipeline")


def test_body_rate_deadline_is_the_grace_plus_a_second_per_min_rate_bytes() -> None:
    assert body_rate_deadline(100.0, 0, 5.0, 1024.0) == 105.0
    assert body_rate_deadline(100.0, 2048, 5.0, 1024.0) == 107.0
    # A body that keeps the rate never falls behind its deadline.
    now, received = 100.0, 0
    for _ in range(60):
        now += 1.0
        received += 1024
        assert now < body_rate_deadline(100.0, received, 5.0, 1024.0)
    # One that sends less falls behind once the grace is spent.
    assert body_rate_deadline(100.0, 512 * 11, 5.0, 1024.0) <= 111.0


def test_an_upgrade_request_with_a_body_is_refused() -> None:
    check_upgrade(True, True)
    check_upgrade(False, False)
    refusal = refused(check_upgrade, True, False)
    assert (refusal.status, refusal.kind) == (400, "upgrade_body")


def test_a_request_whose_app_a_reload_removed_is_404() -> None:
    gone = app_gone("shop")
    assert (gone.status, gone.kind) == (404, "no_route") and "shop" in gone.reason
