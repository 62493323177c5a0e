"""The local control plane's HTTP API as the tests call it: plain aiohttp, every answer
JSON, waits bounded (WAIT) and polled (POLL), never a speed assertion."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from stack import sample_app_spec

WAIT = 20.0  # upper bound of any single wait for a state; never a speed assertion
POLL = 0.05


def app(name: str = "hello", *extra_args: str, **overrides: Any) -> dict[str, Any]:
    """A sample-app [[apps]] entry with short deadlines; extra_args go to sample_app.py."""
    spec = sample_app_spec(name, **{"start_timeout": "10s", "drain_grace": "1s", **overrides})
    spec["command"] = [*spec["command"], *extra_args]
    return spec


class Api:
    """Plain aiohttp calls to one control plane; every answer must be JSON."""

    def __init__(self, session: aiohttp.ClientSession, cp: Any) -> None:
        self.session = session
        self.cp = cp

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body); fails the test on a non-JSON answer or a 500."""
        sent = dict(self.cp.headers()) if auth else {}
        sent.update(headers or {})
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.cp.url + path, headers=sent, **kwargs) as resp:
            raw = await resp.read()
            status, content_type = resp.status, resp.content_type
        assert status < 500 or status == 503, f"{method} {path} -> {status} {raw[:300]!r}"
        assert content_type == "application/json", f"{method} {path}: {content_type} {raw[:200]!r}"
        return status, json.loads(raw)

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, data = await self.call(method, path, body, **kw)
        assert status in (200, 201), f"{method} {path} -> {status} {data}"
        return data

    async def error(
        self,
        status: int,
        method: str,
        path: str,
        body: Any = None,
        reason_code: str = "",
        **kw: Any,
    ) -> str:
        """Assert an error answer of `status` (and `reason_code`) in the protocol's shape."""
        got, data = await self.call(method, path, body, **kw)
        assert got == status, f"{method} {path}: expected {status}, got {got} {data}"
        assert_error_body(data)
        assert data.get("reason_code", "") == reason_code, data
        return data["message"]

    # ---- resources

    async def create(self, app_name: str = "hello", key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"app": app_name}
        if key is not None:
            body["idempotency_key"] = key
        return await self.ok("POST", "/v1/allocations", body)

    async def allocation(self, allocation_id: str) -> dict[str, Any]:
        return await self.ok("GET", f"/v1/allocations/{allocation_id}")

    async def allocations(self) -> list[dict[str, Any]]:
        return (await self.ok("GET", "/v1/allocations"))["allocations"]

    async def promotion(self, promotion_id: str) -> dict[str, Any]:
        return await self.ok("GET", f"/v1/promotions/{promotion_id}")

    async def host(self, name: str = "local") -> dict[str, Any]:
        return await self.ok("GET", f"/v1/hosts/{name}")

    async def region(self) -> dict[str, Any]:
        return await self.ok("GET", "/v1/region")

    async def routes(self) -> dict[str, Any]:
        return await self.ok("GET", "/v1/routes")

    async def route_of(self, app_name: str = "hello") -> dict[str, Any] | None:
        for route in (await self.routes())["apps"]:
            if route["app"] == app_name:
                return route
        return None

    async def promote(self, allocation_id: str, app_name: str = "hello", **extra: Any) -> Any:
        body = {"app": app_name, "allocation_id": allocation_id, **extra}
        status, data = await self.call("POST", "/v1/promotions", body)
        assert status == 201, data
        return data

    async def journal(self, subject: str, machine: str | None = None) -> list[dict[str, Any]]:
        entries = (await self.ok("GET", f"/v1/journal?subject={subject}"))["entries"]
        assert all(e["subject"] == subject for e in entries), entries
        return [e for e in entries if machine is None or e["machine"] == machine]

    async def path(self, subject: str, machine: str | None = None) -> list[str]:
        """The states `subject` (of `machine`) went through, in order, from the journal.

        Rows that record an event without a move (from_state == to_state) are left out.
        """
        entries = await self.journal(subject, machine)
        entries = [e for e in entries if e["from_state"] != e["to_state"]]
        for before, after in itertools.pairwise(entries):
            assert before["to_state"] == after["from_state"], f"gap in the journal: {entries}"
        return [e["to_state"] for e in entries]

    # ---- waiting

    async def until(
        self,
        fetch: Callable[[], Awaitable[dict[str, Any]]],
        done: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = WAIT,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            value = await fetch()
            if done(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; last: {value}\n"
                    f"control plane output:\n{self.cp.output()}"
                )
            await asyncio.sleep(POLL)

    async def alloc_until(self, allocation_id: str, *states: str, **kw: Any) -> dict[str, Any]:
        return await self.until(
            lambda: self.allocation(allocation_id),
            lambda a: a["state"] in states,
            f"allocation {allocation_id} in {states}",
            **kw,
        )

    async def promotion_until(self, promotion_id: str, *states: str) -> dict[str, Any]:
        return await self.until(
            lambda: self.promotion(promotion_id),
            lambda p: p["state"] in states,
            f"promotion {promotion_id} in {states}",
        )

    async def ready(self, app_name: str = "hello") -> dict[str, Any]:
        alloc = await self.create(app_name)
        return await self.alloc_until(alloc["id"], "ready")


def assert_error_body(data: Any) -> None:
    assert isinstance(data, dict) and set(data) - {"reason_code"} == {"error", "message"}, data
    assert isinstance(data["error"], str) and data["error"], data
    assert isinstance(data["message"], str) and data["message"], data
    # Present only when the error names a gate or failure mode (machines.py).
    assert data.get("reason_code", "x"), data
