"""Bad input to every endpoint of the local control plane: always a 4xx JSON error.

Wrong types, unknown fields, bodies that are not JSON or not objects, bodies over
max_body (413), missing or wrong bearer tokens (401), unknown ids (404), bad
query parameters (400). Every answer is `{"error", "message"}` JSON (with a
`reason_code` when it names a gate or failure mode) and never a 500; the control
plane's output must not mention an internal error afterwards
(the `control_plane` fixture of conftest.py checks that).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from controlplane_client import Api, app, assert_error_body
from helpers import close, connect, exchange, request_bytes, send

pytestmark = pytest.mark.timeout(90)

# Every route of the API, with the ids filled in by the test.
ROUTES = [
    ("GET", "/v1/allocations"),
    ("POST", "/v1/allocations"),
    ("GET", "/v1/allocations/{aid}"),
    ("GET", "/v1/allocations/{aid}/watch?version=0&timeout=0"),
    ("POST", "/v1/allocations/{aid}/drain"),
    ("POST", "/v1/allocations/{aid}/stop"),
    ("GET", "/v1/hosts"),
    ("GET", "/v1/hosts/local"),
    ("POST", "/v1/hosts/local/cordon"),
    ("POST", "/v1/hosts/local/uncordon"),
    ("POST", "/v1/hosts/local/drain"),
    ("GET", "/v1/routes"),
    ("GET", "/v1/routes/changes?after=0&timeout=0"),
    ("POST", "/v1/routes/cas"),
    ("GET", "/v1/edges"),
    ("POST", "/v1/edges"),
    ("POST", "/v1/edges/edge-1/ack"),
    ("POST", "/v1/promotions"),
    ("GET", "/v1/promotions/{pid}"),
    ("POST", "/v1/promotions/{pid}/approve"),
    ("GET", "/v1/region"),
    ("PUT", "/v1/region"),
    ("GET", "/v1/journal"),
    ("GET", "/v1/machines"),
    ("GET", "/v1/no-such-thing"),
]

# Endpoints that read a JSON body, and a valid body for each.
BODY_ENDPOINTS = [
    ("POST", "/v1/allocations", lambda ids: {"app": "hello"}),
    ("POST", "/v1/allocations/{aid}/drain", lambda ids: {"deadline_s": 5}),
    ("POST", "/v1/hosts/local/drain", lambda ids: {"deadline_s": 5, "replace": False}),
    (
        "POST",
        "/v1/routes/cas",
        lambda ids: {"app": "hello", "expected_epoch": 0, "allocation_ids": []},
    ),
    ("POST", "/v1/edges", lambda ids: {"edge_id": "edge-1"}),
    ("POST", "/v1/edges/edge-1/ack", lambda ids: {"edge_id": "edge-1", "epoch": 0}),
    ("POST", "/v1/promotions", lambda ids: {"app": "hello", "allocation_id": ids["aid"]}),
    ("PUT", "/v1/region", lambda ids: {"state": "eligible"}),
]


@pytest.fixture
async def api(api_for) -> tuple[Api, dict[str, str]]:
    """A control plane with a ready allocation, a promotion of it and a registered edge."""
    api = api_for([app("hello")])
    alloc = await api.ready()
    promotion = await api.promote(alloc["id"])
    await api.promotion_until(promotion["id"], "healthy", "failed", "rolled_back")
    await api.ok("POST", "/v1/edges", {"edge_id": "edge-1"})
    return api, {"aid": alloc["id"], "pid": promotion["id"]}


async def test_every_endpoint_needs_the_bearer_token(api) -> None:
    api, ids = api
    for method, template in ROUTES:
        path = template.format(**ids)
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {api.cp.token}"},
            {"Authorization": f"Bearer {api.cp.token}x"},
            {"Authorization": f"bearer {api.cp.token}"},
            {"Authorization": "Bearer"},
        ):
            got, data = await api.call(method, path, {}, headers=headers, auth=False)
            assert got == 401, (method, path, headers, data)
            assert_error_body(data)
            assert data["error"] == "unauthorized"
    # Only the liveness probe is open.
    async with api.session.get(api.cp.url + "/healthz") as resp:
        assert resp.status == 200


async def test_token_with_bytes_that_are_not_utf8_is_401(api) -> None:
    api, _ = api
    for value in (b"Bearer \xff\xfe", b"\xc3(", b"Bearer " + api.cp.token.encode() + b"\x80"):
        raw = (
            b"GET /v1/region HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
            + value
            + b"\r\nConnection: close\r\n\r\n"
        )
        resp = await exchange(api.cp.port, raw)
        assert resp is not None and resp.status == 401, (value, resp)
        assert_error_body(json.loads(resp.body))


async def test_bodies_that_are_not_json_or_not_objects_are_400(api) -> None:
    api, ids = api
    bad_bodies = [b"{not json", b"[]", b"null", b"42", b'"text"', b"\xff\xfe{}", b"{}{}", b"{"]
    for method, template, _ in BODY_ENDPOINTS:
        path = template.format(**ids)
        for raw in bad_bodies:
            got, data = await api.call(
                method, path, data=raw, headers={"Content-Type": "application/json"}
            )
            assert got == 400, (method, path, raw, data)
            assert_error_body(data)
            assert data["error"] == "bad_request"
    # An empty body is "{}": refused where a field is required.
    for method, path in (
        ("POST", "/v1/allocations"),
        ("POST", "/v1/routes/cas"),
        ("POST", "/v1/edges"),
        ("POST", "/v1/edges/edge-1/ack"),
        ("POST", "/v1/promotions"),
        ("PUT", "/v1/region"),
    ):
        message = await api.error(400, method, path, data=b"")
        assert "required" in message or "missing" in message.lower(), message


async def test_unknown_fields_are_400(api) -> None:
    api, ids = api
    for method, template, valid in BODY_ENDPOINTS:
        path = template.format(**ids)
        body = {**valid(ids), "surprise": 1}
        message = await api.error(400, method, path, body)
        assert "surprise" in message, (path, message)


async def test_wrong_types_and_values_are_400(api) -> None:
    api, ids = api
    aid = ids["aid"]
    cases = [
        ("POST", "/v1/allocations", {"app": 5}),
        ("POST", "/v1/allocations", {"app": ["hello"]}),
        ("POST", "/v1/allocations", {"app": "hello", "idempotency_key": 7}),
        ("POST", "/v1/allocations", {}),
        ("POST", f"/v1/allocations/{aid}/drain", {"deadline_s": "soon"}),
        ("POST", f"/v1/allocations/{aid}/drain", {"deadline_s": -1}),
        ("POST", f"/v1/allocations/{aid}/drain", {"deadline_s": 1e300}),
        ("POST", f"/v1/allocations/{aid}/drain", {"deadline_s": None}),
        ("POST", "/v1/hosts/local/drain", {"deadline_s": "x"}),
        ("POST", "/v1/hosts/local/drain", {"replace": "yes"}),
        ("POST", "/v1/hosts/local/drain", {"deadline_s": -5}),
        ("POST", "/v1/routes/cas", {"app": "hello", "expected_epoch": "1", "allocation_ids": []}),
        ("POST", "/v1/routes/cas", {"app": "hello", "expected_epoch": 1.5, "allocation_ids": []}),
        ("POST", "/v1/routes/cas", {"app": "hello", "expected_epoch": 0, "allocation_ids": aid}),
        ("POST", "/v1/routes/cas", {"app": "hello", "expected_epoch": 0}),
        ("POST", "/v1/edges", {"edge_id": 5}),
        ("POST", "/v1/edges", {"edge_id": ""}),
        ("POST", "/v1/edges", {"edge_id": "e" * 201}),
        ("POST", "/v1/edges/edge-1/ack", {"edge_id": "edge-1", "epoch": "x"}),
        ("POST", "/v1/edges/edge-1/ack", {"edge_id": "edge-2", "epoch": 1}),
        ("POST", "/v1/edges/edge-1/ack", {"edge_id": "edge-1"}),
        # An epoch the control plane has not issued yet.
        ("POST", "/v1/edges/edge-1/ack", {"edge_id": "edge-1", "epoch": 10**30}),
        ("POST", "/v1/edges/edge-1/ack", {"edge_id": "edge-1", "epoch": 1000}),
        ("POST", "/v1/promotions", {"app": "hello", "allocation_id": 1}),
        ("POST", "/v1/promotions", {"app": "hello", "allocation_id": aid, "expected_epoch": "x"}),
        (
            "POST",
            "/v1/promotions",
            {"app": "hello", "allocation_id": aid, "propagation_timeout_s": 0},
        ),
        (
            "POST",
            "/v1/promotions",
            {"app": "hello", "allocation_id": aid, "propagation_timeout_s": 1e9},
        ),
        ("PUT", "/v1/region", {"state": "requested"}),
        ("PUT", "/v1/region", {"state": 1}),
        ("PUT", "/v1/region", {"state": "eligible", "reason": 5}),
        ("PUT", "/v1/region", {}),
    ]
    for method, path, body in cases:
        message = await api.error(400, method, path, body)
        assert message, (method, path, body)
    # Nothing above changed anything.
    assert (await api.region())["state"] == "eligible"
    assert (await api.host())["state"] == "uncordoned"
    assert (await api.allocation(aid))["state"] == "ready"
    assert len(await api.allocations()) == 1
    edges = (await api.ok("GET", "/v1/edges"))["edges"]
    assert [(e["edge_id"], e["acked_epoch"]) for e in edges] == [("edge-1", 0)]


async def test_bad_query_parameters_are_400(api) -> None:
    api, ids = api
    aid = ids["aid"]
    for path in (
        f"/v1/allocations/{aid}/watch",
        f"/v1/allocations/{aid}/watch?version=abc",
        f"/v1/allocations/{aid}/watch?version=1.5",
        f"/v1/allocations/{aid}/watch?version=1&timeout=abc",
        f"/v1/allocations/{aid}/watch?version=1&timeout=-1",
        f"/v1/allocations/{aid}/watch?version=1&timeout=nan",
        f"/v1/allocations/{aid}/watch?version=1&timeout=inf",
        f"/v1/allocations/{aid}/watch?version=1&timeout=99999",
        f"/v1/allocations/{aid}/watch?version={'9' * 5000}",
        "/v1/routes/changes",
        "/v1/routes/changes?after=abc",
        "/v1/routes/changes?after=",
        "/v1/routes/changes?after=0&timeout=x",
        "/v1/routes/changes?after=0&timeout=-0.5",
    ):
        message = await api.error(400, "GET", path)
        assert message, path


async def test_unknown_ids_are_404(api) -> None:
    api, ids = api
    aid = ids["aid"]
    cases: list[tuple[str, str, Any]] = [
        ("GET", "/v1/allocations/a-nope", None),
        ("GET", "/v1/allocations/a-nope/watch?version=0&timeout=0", None),
        ("POST", "/v1/allocations/a-nope/drain", {"deadline_s": 1}),
        ("POST", "/v1/allocations/a-nope/stop", None),
        ("GET", "/v1/allocations/%ff", None),
        ("GET", "/v1/allocations/%00", None),
        ("GET", "/v1/hosts/nope", None),
        ("POST", "/v1/hosts/nope/cordon", None),
        ("POST", "/v1/hosts/nope/uncordon", None),
        ("POST", "/v1/hosts/nope/drain", {}),
        ("GET", "/v1/promotions/p-nope", None),
        ("POST", "/v1/promotions/p-nope/approve", None),
        ("POST", "/v1/edges/ghost/ack", {"edge_id": "ghost", "epoch": 1}),
        ("GET", "/v1/routes/changes?after=0&timeout=0&edge_id=ghost", None),
        ("POST", "/v1/allocations", {"app": "nope"}),
        ("POST", "/v1/routes/cas", {"app": "nope", "expected_epoch": 0, "allocation_ids": []}),
        ("POST", "/v1/promotions", {"app": "nope", "allocation_id": aid}),
        ("POST", "/v1/promotions", {"app": "hello", "allocation_id": "a-nope"}),
        ("GET", "/v1/no-such-thing", None),
        ("GET", "/", None),
    ]
    route = await api.route_of()
    assert route is not None
    cases.append(
        (
            "POST",
            "/v1/routes/cas",
            {"app": "hello", "expected_epoch": route["epoch"], "allocation_ids": ["a-nope"]},
        )
    )
    for method, path, body in cases:
        got, data = await api.call(method, path, body)
        assert got == 404, (method, path, data)
        assert_error_body(data)
        assert data["error"] == "not_found"
    assert await api.route_of() == route


async def test_wrong_method_is_405_json(api) -> None:
    api, ids = api
    for method, path in (
        ("DELETE", "/v1/allocations"),
        ("PUT", "/v1/allocations/{aid}"),
        ("GET", "/v1/allocations/{aid}/drain"),
        ("POST", "/v1/region"),
        ("PATCH", "/v1/routes"),
    ):
        message = await api.error(405, method, path.format(**ids))
        assert message


async def test_huge_bodies_are_413(api) -> None:
    api, ids = api
    for method, template, valid in BODY_ENDPOINTS:
        path = template.format(**ids)
        # Valid JSON, but over max_body (64 KiB by default).
        body = {**valid(ids), "padding": "x" * (80 * 1024)}
        message = await api.error(413, method, path, body)
        assert message
        # Chunked, with no Content-Length up front.

        async def chunks(size: int = 80 * 1024):
            for _ in range(size // 1024):
                yield b" " * 1024

        got, data = await api.call(
            method, path, data=chunks(), headers={"Content-Type": "application/json"}
        )
        assert got == 413, (method, path, data)
        assert_error_body(data)
    assert len(await api.allocations()) == 1


async def test_odd_but_well_formed_values_are_answered_without_a_500(api) -> None:
    """Huge integers, lone surrogates, NUL characters: a 2xx or a 4xx, never a 500."""
    api, ids = api
    aid = ids["aid"]
    big = 10**30
    cases: list[tuple[str, str, Any]] = [
        ("GET", f"/v1/allocations/{aid}/watch?version={big}&timeout=0", None),
        ("GET", f"/v1/allocations/{aid}/watch?version=-{big}&timeout=0", None),
        ("GET", f"/v1/routes/changes?after={big}&timeout=0", None),
        ("GET", f"/v1/routes/changes?after=-{big}&timeout=0", None),
        ("GET", "/v1/journal?subject=%ff", None),
        ("GET", "/v1/journal?subject=%00", None),
        ("GET", "/v1/allocations?app=%ff", None),
        ("POST", "/v1/routes/cas", {"app": "hello", "expected_epoch": big, "allocation_ids": []}),
        ("POST", "/v1/routes/cas", {"app": "hello", "expected_epoch": -big, "allocation_ids": []}),
        ("POST", "/v1/edges/edge-1/ack", {"edge_id": "edge-1", "epoch": -big}),
        ("POST", f"/v1/allocations/{aid}/watch", None),
        ("POST", "/v1/allocations", {"app": "hello\u0000"}),
        ("POST", "/v1/edges", {"edge_id": "edge\u0000nul"}),
        ("POST", "/v1/promotions", {"app": "hello", "allocation_id": aid, "expected_epoch": big}),
    ]
    for method, path, body in cases:
        got, data = await api.call(method, path, body)
        assert got < 500, (method, path, data)
        if got >= 400:
            assert_error_body(data)
    # JSON strings with lone surrogates (not encodable as UTF-8).
    for method, template, valid in BODY_ENDPOINTS:
        path = template.format(**ids)
        for key, value in valid(ids).items():
            if not isinstance(value, str):
                continue
            body = json.dumps({**valid(ids), key: "\ud800x"}).encode()
            got, data = await api.call(
                method, path, data=body, headers={"Content-Type": "application/json"}
            )
            assert got < 500, (method, path, key, data)
            if got >= 400:
                assert_error_body(data)
    for key in ("\ud800", "k\udfff"):
        body = json.dumps({"app": "hello", "idempotency_key": key}).encode()
        got, data = await api.call(
            "POST", "/v1/allocations", data=body, headers={"Content-Type": "application/json"}
        )
        assert got < 500, data


async def test_requests_over_a_raw_socket(api) -> None:
    """Malformed requests the aiohttp client would not send."""
    api, _ = api
    token = api.cp.token
    auth = [("Authorization", f"Bearer {token}"), ("Connection", "close")]
    # Content-Length promising more than max_body.
    raw = request_bytes(
        "POST",
        "/v1/allocations",
        "127.0.0.1",
        [*auth, ("Content-Length", str(10 * 1024 * 1024)), ("Content-Type", "application/json")],
    )
    resp = await exchange(api.cp.port, raw)
    assert resp is not None and resp.status == 413, resp
    assert_error_body(json.loads(resp.body))
    # Wrong Content-Type with a valid JSON body is still just JSON to the API.
    raw = request_bytes(
        "POST",
        "/v1/edges",
        "127.0.0.1",
        [*auth, ("Content-Type", "text/plain")],
        json.dumps({"edge_id": "edge-raw"}).encode(),
    )
    resp = await exchange(api.cp.port, raw)
    assert resp is not None and resp.status == 200, resp
    # A client that hangs up halfway through its body.
    for path in ("/v1/allocations", "/v1/edges"):
        _, writer = await connect(api.cp.port)
        raw = request_bytes(
            "POST", path, "127.0.0.1", [*auth, ("Content-Length", "1000")], b'{"app": "hel'
        )
        assert await send(writer, raw)
        await close(writer)
    # Nothing observable follows; give the server a moment to see the hang-ups, then
    # check it is still serving and logged no internal error.
    await asyncio.sleep(0.5)
    assert (await api.region())["state"] == "eligible"
    assert "internal error" not in api.cp.output()
