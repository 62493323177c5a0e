"""HTTP API of the local control plane (aiohttp); the contract is openapi.yaml beside this file.

Handlers only decode, call `ControlPlane`, and encode. Every error leaves as JSON
`{"error": code, "message": ...}` with a 4xx (or 503) status, never a bare 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from scheduler_client.config_file import ConfigError, parse_address
from scheduler_client.local.config import load_controlplane_config, read_token
from scheduler_client.local.controlplane import ControlPlane
from scheduler_client.local.store import ControlPlaneStore
from scheduler_client.machine_spec import IllegalTransition
from scheduler_client.models import (
    BadRequest,
    ControlPlaneError,
    CreateAllocation,
    CreatePromotion,
    DrainRequest,
    EdgeAck,
    EdgeRegistration,
    ErrorBody,
    HostDrainRequest,
    RouteCas,
    SetRegion,
    TooLarge,
)

T = TypeVar("T")

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_encoder = msgspec.json.Encoder()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, reason_code: str = "") -> web.Response:
    body = ErrorBody(error=code, message=message, reason_code=reason_code)  # type: ignore[arg-type]
    return _json(body, status)


async def _body(request: web.Request, kind: type[T]) -> T:
    limit = request.client_max_size
    # A declared length over the limit is refused before reading (or waiting for) it.
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise TooLarge(f"body larger than {limit} bytes") from None
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None


def _int_query(request: web.Request, name: str, default: int | None = None) -> int:
    value = request.query.get(name)
    if value is None:
        if default is None:
            raise BadRequest(f"query parameter {name!r} is required")
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be an integer") from None


def _float_query(request: web.Request, name: str, default: float) -> float:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be a number") from None
    if not 0 <= number <= 3600:
        raise BadRequest(f"query parameter {name!r} must be between 0 and 3600")
    return number


def _middlewares(token: str) -> list:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ControlPlaneError as exc:
            return _error(exc.status, exc.code, exc.message, exc.reason_code)
        except IllegalTransition as exc:
            return _error(409, "conflict", str(exc))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"body larger than {request.client_max_size} bytes")
        except ConnectionResetError:
            # The client went away mid-request (e.g. while sending the body): nobody
            # will read this answer, and it is not a server bug.
            return _error(400, "bad_request", "connection lost before the request was read")
        except web.HTTPException as exc:
            code = {404: "not_found", 405: "bad_request"}.get(exc.status, "bad_request")
            return _error(exc.status, code, exc.reason)
        except Exception as exc:  # a bug, still answered in the protocol's shape
            logger.error("internal error on %s: %r", request.path, exc, exc_info=exc)
            return _error(500, "internal", "internal error")

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            # Header bytes that are not UTF-8 arrive as surrogates: compare them as bytes.
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return _error(401, "unauthorized", "a valid bearer token is required")
        return await handler(request)

    return [errors, auth]


def build_app(cp: ControlPlane, token: str) -> web.Application:
    app = web.Application(middlewares=_middlewares(token), client_max_size=int(cp.section.max_body))
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    @routes.post("/v1/allocations")
    async def create_allocation(request: web.Request) -> web.Response:
        alloc, created = cp.create_allocation(await _body(request, CreateAllocation))
        return _json(alloc, 201 if created else 200)

    @routes.get("/v1/allocations")
    async def list_allocations(request: web.Request) -> web.Response:
        return _json({"allocations": cp.store.allocations(request.query.get("app"))})

    @routes.get("/v1/allocations/{id}")
    async def get_allocation(request: web.Request) -> web.Response:
        return _json(cp.get_allocation(request.match_info["id"]))

    @routes.get("/v1/allocations/{id}/watch")
    async def watch_allocation(request: web.Request) -> web.Response:
        version = _int_query(request, "version")
        timeout = _float_query(request, "timeout", 30.0)
        return _json(await cp.watch_allocation(request.match_info["id"], version, timeout))

    @routes.post("/v1/allocations/{id}/drain")
    async def drain_allocation(request: web.Request) -> web.Response:
        body = await _body(request, DrainRequest)
        return _json(cp.drain_allocation(request.match_info["id"], body.deadline_s))

    @routes.post("/v1/allocations/{id}/stop")
    async def stop_allocation(request: web.Request) -> web.Response:
        return _json(cp.drain_allocation(request.match_info["id"], 0.0))

    @routes.get("/v1/hosts")
    async def list_hosts(_: web.Request) -> web.Response:
        return _json({"hosts": cp.hosts()})

    @routes.get("/v1/hosts/{name}")
    async def get_host(request: web.Request) -> web.Response:
        return _json(cp.get_host(request.match_info["name"]))

    @routes.post("/v1/hosts/{name}/cordon")
    async def cordon(request: web.Request) -> web.Response:
        return _json(cp.cordon_host(request.match_info["name"]))

    @routes.post("/v1/hosts/{name}/uncordon")
    async def uncordon(request: web.Request) -> web.Response:
        return _json(cp.uncordon_host(request.match_info["name"]))

    @routes.post("/v1/hosts/{name}/drain")
    async def drain_host(request: web.Request) -> web.Response:
        body = await _body(request, HostDrainRequest)
        if not 0 <= body.deadline_s <= 86400:
            raise BadRequest("deadline_s must be between 0 and 86400")
        return _json(cp.drain_host(request.match_info["name"], body.deadline_s, body.replace))

    @routes.get("/v1/routes")
    async def snapshot(_: web.Request) -> web.Response:
        return _json(cp.route_snapshot())

    @routes.get("/v1/routes/changes")
    async def changes(request: web.Request) -> web.Response:
        after = _int_query(request, "after")
        timeout = _float_query(request, "timeout", 30.0)
        return _json(await cp.route_changes(after, timeout, request.query.get("edge_id")))

    @routes.post("/v1/routes/cas")
    async def cas(request: web.Request) -> web.Response:
        body = await _body(request, RouteCas)
        return _json(cp.route_cas(body.app, body.expected_epoch, body.allocation_ids))

    @routes.get("/v1/edges")
    async def list_edges(_: web.Request) -> web.Response:
        return _json({"edges": cp.edges()})

    @routes.post("/v1/edges")
    async def register_edge(request: web.Request) -> web.Response:
        body = await _body(request, EdgeRegistration)
        return _json(cp.register_edge(body.edge_id))

    @routes.post("/v1/edges/{edge_id}/ack")
    async def ack(request: web.Request) -> web.Response:
        body = await _body(request, EdgeAck)
        if body.edge_id != request.match_info["edge_id"]:
            raise BadRequest("edge_id in the body differs from the path")
        return _json(cp.ack_epoch(body.edge_id, body.epoch))

    @routes.post("/v1/promotions")
    async def create_promotion(request: web.Request) -> web.Response:
        return _json(cp.create_promotion(await _body(request, CreatePromotion)), 201)

    @routes.get("/v1/promotions/{id}")
    async def get_promotion(request: web.Request) -> web.Response:
        return _json(cp.get_promotion(request.match_info["id"]))

    @routes.post("/v1/promotions/{id}/approve")
    async def approve(request: web.Request) -> web.Response:
        return _json(cp.approve_promotion(request.match_info["id"]))

    @routes.get("/v1/region")
    async def get_region(_: web.Request) -> web.Response:
        return _json(cp.get_region())

    @routes.put("/v1/region")
    async def set_region(request: web.Request) -> web.Response:
        body = await _body(request, SetRegion)
        return _json(cp.set_region(body.state, body.reason))

    @routes.get("/v1/machines")
    async def machines(_: web.Request) -> web.Response:
        return _json(cp.machine_report())

    @routes.get("/v1/journal")
    async def journal(request: web.Request) -> web.Response:
        return _json({"entries": cp.store.journal_entries(request.query.get("subject"))})

    app.add_routes(routes)
    return app


async def serve(config_path: str) -> int:
    config = load_controlplane_config(config_path)
    token = read_token(config.controlplane, config_path)
    store = ControlPlaneStore(config.controlplane.state_file)
    cp = ControlPlane(config, store, cwd=str(Path(config_path).resolve().parent))
    await cp.start()
    runner = web.AppRunner(build_app(cp, token), access_log=None)
    await runner.setup()
    host, port = parse_address(config.controlplane.listen)
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", host, port, exc.strerror)
        await cp.close()
        return 2
    logger.info(
        "listening on %s, state in %s",
        config.controlplane.listen,
        config.controlplane.state_file,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    await cp.close()
    store.close()
    return 0


def run(config_path: str) -> int:
    import uvloop

    try:
        return uvloop.run(serve(config_path))
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
