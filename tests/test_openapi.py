"""openapi.yaml stays the truth: its schemas are the models', its paths the server's routes."""

from __future__ import annotations

from pathlib import Path

import msgspec
import yaml

from scheduler_client import models
from scheduler_client.local.server import build_app

SPEC = Path(__file__).resolve().parent.parent / "scheduler_client" / "openapi.yaml"


def _spec() -> dict:
    return yaml.safe_load(SPEC.read_text())


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
