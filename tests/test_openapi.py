"""openapi.yaml stays the truth: its schemas are the models', its paths the server's routes,
and every machine's state field is an enum of exactly that machine's states."""

from __future__ import annotations

import functools
from pathlib import Path

import msgspec
import pytest
import yaml
from aiohttp import web

from scheduler_client import models
from scheduler_client.client import ControlPlaneClient
from scheduler_client.local.server import build_app
from scheduler_client.machine_spec import MachineSpec
from scheduler_client.machines import ALLOCATION, HOST_DRAIN, PROMOTION, REGION

SPEC = Path(__file__).resolve().parent.parent / "scheduler_client" / "openapi.yaml"


@functools.cache
def _spec() -> dict:
    return yaml.safe_load(SPEC.read_text())  # read-only for the tests; parsed once


def test_component_schemas_equal_the_msgspec_models() -> None:
    spec = _spec()
    kinds = [
        getattr(models, name)
        for name in spec["components"]["schemas"]
        if hasattr(models, name) and isinstance(getattr(models, name), type)
    ]
    _, generated = msgspec.json.schema_components(kinds, ref_template="#/components/schemas/{name}")
    assert spec["components"]["schemas"] == generated


def test_every_server_route_is_documented_and_nothing_else() -> None:
    class _Section:
        max_body = 1024

    class _Stub:
        section = _Section()

    app = build_app(_Stub(), "token")  # type: ignore[arg-type]
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.method != "HEAD"
    }
    documented = {
        (path, method) for path, operations in _spec()["paths"].items() for method in operations
    }
    assert served == documented


def test_every_operation_documents_its_errors_as_error_body() -> None:
    spec = _spec()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                continue
            assert "401" in operation["responses"], (path, method)
    for response in spec["components"]["responses"].values():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}


# Every schema property that holds a machine's state, and the machine it belongs to.
STATE_FIELDS: dict[tuple[str, str], MachineSpec] = {
    ("Allocation", "state"): ALLOCATION,
    ("Host", "state"): HOST_DRAIN,
    ("Promotion", "state"): PROMOTION,
    ("Region", "state"): REGION,
    ("RouteTarget", "state"): ALLOCATION,
    ("RouteTarget", "host_state"): HOST_DRAIN,
}


@pytest.mark.parametrize(
    ("schema", "field"), sorted(STATE_FIELDS), ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_state_field_is_an_enum_of_its_machines_states(schema: str, field: str) -> None:
    prop = _spec()["components"]["schemas"][schema]["properties"][field]
    assert "enum" in prop, f"{schema}.{field} is not an enum: {prop}"
    assert sorted(prop["enum"]) == sorted(STATE_FIELDS[schema, field].states)


def test_no_state_field_is_left_a_bare_string() -> None:
    schemas = _spec()["components"]["schemas"]
    found = {
        (schema, name)
        for schema, body in schemas.items()
        for name in body.get("properties", {})
        if name == "state" or name.endswith("_state")
    }
    # SetRegion takes the two states an operator may set: a subset, checked below.
    assert found - {("SetRegion", "state")} == set(STATE_FIELDS)
    settable = schemas["SetRegion"]["properties"]["state"]["enum"]
    assert set(settable) == {"eligible", "disabled"} <= set(REGION.states)


def test_an_unknown_state_is_a_decode_error_naming_the_field() -> None:
    body = b'{"id": "a-1", "app": "hello", "state": "running"}'
    with pytest.raises(msgspec.ValidationError, match=r"Invalid enum value 'running'.*\$\.state"):
        msgspec.json.decode(body, type=models.Allocation)


async def test_the_client_reports_an_unknown_state_as_an_undecodable_answer() -> None:
    async def region(_: web.Request) -> web.Response:
        return web.json_response({"name": "local", "state": "sunsetting"})

    app = web.Application()
    app.router.add_get("/v1/region", region)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with ControlPlaneClient(url, "tok", timeout=5.0) as client:
            with pytest.raises(models.ControlPlaneError, match=r"undecodable.*'sunsetting'"):
                await client.get_region()
    finally:
        await runner.cleanup()
