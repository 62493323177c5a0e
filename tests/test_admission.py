"""Admission of a request for a cold app, as a plain function: no sockets, no loop."""

from __future__ import annotations

import pytest

from edge.routing.admission import (
    HELD_BODY_RESERVE,
    AppAdmission,
    ColdRequest,
    Hold,
    Queue,
    Reject,
    admit,
)
from edge.routing.classification import facts_from, make_rule
from edge.routing.hold_accounting import HoldAccounting, HoldCaps
from scheduler_client.models import Region

ELIGIBLE = Region(name="eu-1", state="eligible")
WIDE = HoldCaps(1000, 1 << 30)


def app(**overrides) -> AppAdmission:
    values = {"name": "shop", "hold_timeout": 30.0, "caps": WIDE}
    values.update(overrides)
    return AppAdmission(**values)


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    **kw,
) -> ColdRequest:
    headers = headers or []
    return ColdRequest(
        facts=facts_from(method, target, "shop.example.com", headers), headers=headers, **kw
    )


def decide(a: AppAdmission, r: ColdRequest, *, expected: float = 0.0, holds=None, **kw):
    holds = holds if holds is not None else HoldAccounting(WIDE)
    return admit(a, r, kw.pop("region", ELIGIBLE), expected, holds, queue_available=True, **kw)


def test_safe_methods_are_held_and_start_the_wake() -> None:
    for method in (b"GET", b"HEAD", b"OPTIONS"):
        decision = decide(app(), request(method))
        assert decision == Hold(0, starting_page=False, start_wake=True)


def test_unsafe_request_is_rejected_with_the_expected_wake_as_retry_after() -> None:
    decision = decide(app(), request(b"POST"), expected=3.5)
    assert isinstance(decision, Reject)
    assert (decision.status, decision.kind, decision.retry_after) == (503, "not_safe_to_hold", 3.5)
    assert decision.start_wake and decision.gallery == "payment_webhook_while_cold"
    unknown = decide(app(), request(b"POST"))
    assert unknown.retry_after == 5.0


@pytest.mark.parametrize("rules", [(), (make_rule("hold", methods=["PUT"], path="/never"),)])
def test_an_empty_idempotency_key_is_no_key_with_or_without_rules(rules) -> None:
    empty = request(b"POST", headers=[(b"Idempotency-Key", b"")])
    blank = request(b"POST", headers=[(b"Idempotency-Key", b"  ")])
    keyed = request(b"POST", headers=[(b"Idempotency-Key", b"k-1")])
    assert isinstance(decide(app(rules=rules), empty), Reject)
    assert isinstance(decide(app(rules=rules), blank), Reject)
    assert isinstance(decide(app(rules=rules), keyed), Hold)


def test_rules_see_the_origin_form_path_not_the_raw_target() -> None:
    """The front passes the origin-form path; facts drop the query string."""
    rules = (make_rule("hold", methods=["POST"], path_prefix="/hooks/"),)
    decision = decide(app(rules=rules), request(b"POST", b"/hooks/x?y=1"))
    assert isinstance(decision, Hold)


def test_a_disabled_region_refuses_without_waking() -> None:
    region = Region(name="eu-1", state="disabled", reason="maintenance")
    decision = decide(app(), request(), region=region)
    assert isinstance(decision, Reject)
    assert decision.kind == "region_disabled" and not decision.start_wake
    assert "maintenance" in decision.reason and decision.retry_after == 60.0
    assert isinstance(decide(app(), request(), region=None), Hold)


def test_a_wake_slower_than_the_hold_is_refused_at_once() -> None:
    decision = decide(app(hold_timeout=2.0), request(), expected=10.0)
    assert isinstance(decision, Reject) and decision.kind == "wake_slower_than_hold"
    assert decision.retry_after == 10.0 and decision.start_wake


def test_held_body_bytes_are_reserved_as_they_arrive() -> None:
    """Admission reserves no body bytes (the front counts them as they arrive), but a
    declared body that could not fit now is refused at once."""
    assert decide(app(), request(b"GET", content_length=10)).reserve == 0
    assert decide(app(), request(b"GET", content_length=10**6)).reserve == 0
    assert decide(app(), request(b"GET", chunked=True)).reserve == 0
    small = app(caps=HoldCaps(max_held=5, max_held_body_bytes=HELD_BODY_RESERVE))
    holds = HoldAccounting(WIDE)
    holds.reserve("shop", 0)
    assert holds.grow("shop", small.caps, 10)
    assert decide(small, request(b"GET", content_length=10**6), holds=holds).kind == "hold_cap"
    assert isinstance(decide(small, request(b"GET", chunked=True), holds=holds), Hold)


def test_starting_page_only_for_browsers_of_apps_that_have_one() -> None:
    html = request(accepts_html=True)
    assert decide(app(starting_page_after=1.0), html).starting_page
    assert not decide(app(), html).starting_page
    assert not decide(app(starting_page_after=1.0), request()).starting_page


def test_hold_caps_per_app_and_per_worker() -> None:
    holds = HoldAccounting(HoldCaps(max_held=3, max_held_body_bytes=1000))
    small = app(caps=HoldCaps(max_held=2, max_held_body_bytes=100))
    for _ in range(2):
        decision = decide(small, request(), holds=holds)
        assert isinstance(decision, Hold)
        holds.reserve("shop", decision.reserve)
    capped = decide(small, request(), holds=holds)
    assert isinstance(capped, Reject) and capped.kind == "hold_cap" and capped.start_wake
    other = app(name="other")
    assert isinstance(decide(other, request(), holds=holds), Hold)
    holds.reserve("other", 0)
    assert decide(other, request(), holds=holds).kind == "hold_cap"  # worker cap: 3
    too_big = decide(app(name="x"), request(content_length=101), holds=HoldAccounting(WIDE))
    assert isinstance(too_big, Hold)
    assert isinstance(
        decide(small, request(content_length=101), holds=HoldAccounting(WIDE)), Reject
    )


QUEUE_RULES = (make_rule("queue", methods=["POST"], path_prefix="/webhooks/"),)


def queue_app(**overrides) -> AppAdmission:
    return app(
        rules=QUEUE_RULES, queue_max_body=1024, dedupe_key="header:Stripe-Event-Id", **overrides
    )


def test_a_webhook_while_cold_is_queued_with_its_dedupe_key() -> None:
    hook = request(
        b"POST", b"/webhooks/stripe", [(b"Stripe-Event-Id", b"evt_1")], content_length=20
    )
    decision = decide(queue_app(), hook)
    assert decision == Queue(0, 1024, "h:stripe-event-id:evt_1", start_wake=True)
    assert decision.gallery == "payment_webhook_while_cold"
    chunked = decide(queue_app(), request(b"POST", b"/webhooks/x", chunked=True))
    assert isinstance(chunked, Queue) and chunked.reserve == 0 and chunked.dedupe_key == ""


def test_a_webhook_too_large_to_queue_is_413_and_wakes_nothing() -> None:
    decision = decide(queue_app(), request(b"POST", b"/webhooks/x", content_length=1025))
    assert isinstance(decision, Reject)
    assert (decision.status, decision.kind, decision.start_wake) == (413, "body", False)


def test_no_queue_here_refuses_and_never_holds() -> None:
    hook = request(b"POST", b"/webhooks/x", content_length=2)
    no_policy = decide(app(rules=QUEUE_RULES), hook)
    assert isinstance(no_policy, Reject) and no_policy.kind == "queue_unavailable"
    holds = HoldAccounting(WIDE)
    no_store = admit(queue_app(), hook, ELIGIBLE, 0.0, holds, queue_available=False)
    assert isinstance(no_store, Reject) and no_store.kind == "queue_unavailable"


def test_queued_bodies_count_against_the_hold_caps() -> None:
    holds = HoldAccounting(WIDE)
    a = queue_app(caps=HoldCaps(max_held=10, max_held_body_bytes=1500))
    first = decide(a, request(b"POST", b"/webhooks/x", chunked=True), holds=holds)
    holds.reserve("shop", first.reserve)
    assert holds.grow("shop", a.caps, 1024)  # the first body, as it arrived
    second = decide(a, request(b"POST", b"/webhooks/x", content_length=600), holds=holds)
    assert isinstance(second, Reject) and second.kind == "hold_cap"
    chunked = decide(a, request(b"POST", b"/webhooks/x", chunked=True), holds=holds)
    assert isinstance(chunked, Queue)
    holds.reserve("shop", 0)
    assert not holds.grow("shop", a.caps, 600)  # its bytes would not fit: refused as they come
