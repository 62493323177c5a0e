"""Admission of requests for a cold app through a real edge: the same request gets the
same class whatever form its request line has and whether the app has rules."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import exchange
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

HOST = "shop.localhost"


def cold_app(**overrides: Any) -> dict[str, Any]:
    app = {
        "name": "shop",
        "hosts": [HOST],
        "scale_to_zero": True,
        "hold_timeout": "15s",
        "readiness_timeout": "10s",
    }
    app.update(overrides)
    return app


def edge_for(start_edge, cp, app: dict[str, Any]):
    return start_edge(
        apps=[app],
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )


# A rule that never matches these requests: it only makes the app "have rules".
NEVER = {"class": "hold", "methods": ["PUT"], "path": "/never"}


@pytest.mark.parametrize("rules", [[], [NEVER]], ids=["no rules", "unrelated rule"])
async def test_an_empty_idempotency_key_is_no_key(start_control_plane, start_edge, rules) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = edge_for(start_edge, cp, cold_app(rules=rules))
    resp = await exchange(
        edge.port,
        b"POST /echo HTTP/1.1\r\nHost: shop.localhost\r\nIdempotency-Key: \r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    assert resp is not None and resp.status == 503
    assert resp.header("X-Edge-Error") == "not_safe_to_hold"


async def test_absolute_form_target_is_classified_by_its_path(start_control_plane, start_edge):
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    rules = [{"class": "hold", "methods": ["POST"], "path_prefix": "/echo"}]
    edge = edge_for(start_edge, cp, cold_app(rules=rules))
    resp = await exchange(
        edge.port,
        b"POST http://shop.localhost/echo?x=1 HTTP/1.1\r\nHost: other.localhost\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\nhi",
        method="POST",
    )
    assert resp is not None and resp.status == 200, resp
    assert resp.body == b"hi"
