"""Request classes without I/O: ordered rules, then the defaults."""

from __future__ import annotations

import pytest

from edge.routing.classification import classify, facts_from, make_rule


def facts(method: str = "GET", target: str = "/", host: str = "shop.localhost", **headers: str):
    pairs = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return facts_from(method.encode(), target.encode(), host, pairs)


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", {}, "hold"),
        ("HEAD", {}, "hold"),
        ("OPTIONS", {}, "hold"),
        ("POST", {}, "reject"),
        ("DELETE", {}, "reject"),
        ("POST", {"Idempotency_Key": "k1"}, "hold"),
    ],
)
def test_defaults(method: str, headers: dict[str, str], expected: str) -> None:
    assert classify((), facts(method, **headers)) == expected


def test_first_matching_rule_wins() -> None:
    rules = (
        make_rule("reject", methods=["GET"], path_prefix="/admin"),
        make_rule("hold", methods=["GET", "POST"]),
    )
    assert classify(rules, facts("GET", "/admin/users")) == "reject"
    assert classify(rules, facts("POST", "/orders")) == "hold"
    assert classify(rules, facts("PUT", "/orders")) == "reject"  # no rule: default


def test_path_forms_ignore_the_query() -> None:
    exact = (make_rule("reject", path="/hooks/stripe"),)
    glob = (make_rule("reject", path_glob="/hooks/*/events"),)
    assert classify(exact, facts("GET", "/hooks/stripe?x=1")) == "reject"
    assert classify(exact, facts("GET", "/hooks/stripe/2")) == "hold"
    assert classify(glob, facts("GET", "/hooks/github/events")) == "reject"
    assert classify(glob, facts("GET", "/hooks/github/other")) == "hold"


def test_header_presence_value_host_and_content_type() -> None:
    signed = (make_rule("reject", header="Stripe-Signature"),)
    assert classify(signed, facts("GET", Stripe_Signature="t=1")) == "reject"
    valued = (make_rule("hold", header="X-Kind", header_value="retryable"),)
    assert classify(valued, facts("POST", X_Kind="retryable")) == "hold"
    assert classify(valued, facts("POST", X_Kind="once")) == "reject"
    by_host = (make_rule("reject", host="Admin.Localhost"),)
    assert classify(by_host, facts("GET", host="admin.localhost")) == "reject"
    typed = (make_rule("hold", content_type="application/json"),)
    assert classify(typed, facts("POST", Content_Type="application/json; charset=utf-8")) == "hold"
    assert classify(typed, facts("POST", Content_Type="text/plain")) == "reject"
