"""The front against a cold app, over raw sockets: pipelining cannot take the app's hold
slots, and a held request whose app a reload removed is answered, never left hanging.

Real local control plane running the sample app (with a start delay, so the app stays
cold for a while), a real edge process (memory:// store, one worker) in front of it.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from helpers import (
    Closed,
    RawResponse,
    app_entry,
    close,
    connect,
    eventually,
    exchange,
    read_response,
    request_bytes,
    reset,
    send,
    to_toml,
)
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

HOST = "shop.localhost"
START_DELAY = "2"


def slow_sample_app() -> dict[str, Any]:
    spec = sample_app_spec("shop")
    spec["command"] = [*spec["command"], "--start-delay", START_DELAY]
    return spec


def cold_app(**overrides: Any) -> dict[str, Any]:
    app = {
        "name": "shop",
        "hosts": [HOST],
        "scale_to_zero": True,
        "hold_timeout": "20s",
        "readiness_timeout": "15s",
    }
    app.update(overrides)
    return app


def edge_for(start_edge, cp, apps: list[dict[str, Any]], **kwargs: Any):
    return start_edge(
        apps=apps,
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
        **kwargs,
    )


async def read_all(reader: asyncio.StreamReader, limit: int) -> list[RawResponse]:
    """Responses until the connection closes (at most `limit`)."""
    out: list[RawResponse] = []
    while len(out) < limit:
        try:
            out.append(await read_response(reader, timeout=30))
        except Closed:
            break
    return out


async def test_pipelined_gets_to_a_cold_app_do_not_take_its_hold_slots(
    start_control_plane, start_edge
) -> None:
    """500 pipelined GETs on one connection hold one slot (the current request's), so
    another client's GET to the same cold app is held and served, not refused hold_cap."""
    cp = start_control_plane(apps=[slow_sample_app()])
    edge = edge_for(start_edge, cp, [cold_app(max_held=5)])
    reader, writer = await connect(edge.port)
    try:
        burst = b"".join(request_bytes("GET", f"/?n={i}", host=HOST) for i in range(500))
        await send(writer, burst)
        await asyncio.sleep(0.5)  # parsed, and (before the fix) admitted, by now
        other = await exchange(edge.port, request_bytes("GET", "/?other", host=HOST), timeout=30)
        assert other is not None, "the other client's request got no answer"
        assert other.status == 200, (other.status, other.header("X-Edge-Error"))
        answers = await read_all(reader, 501)
    finally:
        await close(writer)
    statuses = [r.status for r in answers]
    assert statuses and set(statuses[:-1]) == {200}, statuses
    # At most [limits] max_pipelined (16) wait behind the current one; the next is refused.
    assert len(answers) < 500, "every pipelined request was parsed ahead and answered"
    assert answers[-1].status == 503 and answers[-1].header("X-Edge-Error") == "pipeline"


async def test_a_trickling_held_body_reserves_only_what_arrived(
    start_control_plane, start_edge
) -> None:
    """A chunked POST that has sent one byte holds one byte of the app's held-body cap,
    not a whole reserve: another client's 1 KiB POST is held and served, not refused."""
    cp = start_control_plane(apps=[slow_sample_app()])
    edge = edge_for(start_edge, cp, [cold_app(max_held_body_bytes="64KiB")])
    head = request_bytes(
        "POST",
        "/echo?slow",
        host=HOST,
        headers=[("Idempotency-Key", "slow-1"), ("Transfer-Encoding", "chunked")],
    )
    reader, writer = await connect(edge.port)
    try:
        await send(writer, head + b"1\r\na\r\n")
        await asyncio.sleep(0.5)
        other = await exchange(
            edge.port,
            request_bytes(
                "POST",
                "/echo?other",
                host=HOST,
                headers=[("Idempotency-Key", "k-2")],
                body=b"x" * 1024,
            ),
            method="POST",
            timeout=30,
        )
        assert other is not None, "the other client's request got no answer"
        assert other.status == 200, (other.status, other.header("X-Edge-Error"))
        await send(writer, b"0\r\n\r\n")
        slow = await read_response(reader, timeout=30)
        assert slow.status == 200
    finally:
        await close(writer)


async def test_pipelined_request_for_an_app_a_reload_removed_is_answered(
    start_control_plane, start_edge, upstream
) -> None:
    """A request for a cold app, pipelined behind a slow one, whose app a reload removes
    before its turn: it is answered (404 or 503) in order, never left hanging."""
    cp = start_control_plane(apps=[slow_sample_app()])
    echo = app_entry("echo", ["app.localhost"], upstream)
    edge = edge_for(start_edge, cp, [echo, cold_app()])
    reader, writer = await connect(edge.port)
    try:
        await send(
            writer,
            request_bytes("GET", "/slow-headers?delay=2", host="app.localhost")
            + request_bytes("GET", "/?pipelined", host=HOST),
        )
        await asyncio.sleep(0.3)  # both parsed; the first is in flight
        config = dict(edge.config)
        config["apps"] = [echo, app_entry("marker", ["marker.localhost"], upstream)]
        edge.config_path.write_text(to_toml(config))
        edge.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            resp = await exchange(edge.port, request_bytes("GET", "/echo", host="marker.localhost"))
            return resp is not None and resp.status == 200

        await eventually(reloaded, timeout=10, what="the reload to apply")
        first = await read_response(reader, timeout=10)
        assert first.status == 200
        try:
            second = await read_response(reader, timeout=10)
        except TimeoutError:
            raise AssertionError(
                "the pipelined request of a removed app was never answered"
            ) from None
    finally:
        await close(writer)
    assert second.status in (404, 503), (second.status, second.body)


async def test_held_clients_that_go_away_give_their_hold_slots_back_at_once(
    start_control_plane, start_edge
) -> None:
    """Held GETs whose clients reset give back their hold slots then, not when the wake
    ends, and the wake's release skips them: with max_held 3, three held clients leave and
    three new GETs are held and served."""
    cp = start_control_plane(apps=[slow_sample_app()])
    edge = edge_for(start_edge, cp, [cold_app(max_held=3)])
    leavers = [await connect(edge.port) for _ in range(3)]
    for i, (_, writer) in enumerate(leavers):
        await send(writer, request_bytes("GET", f"/?leaver={i}", host=HOST))
    await asyncio.sleep(0.3)  # all three held (the app takes 2 s to start)
    for _, writer in leavers:
        reset(writer)  # gone (a FIN alone is a half-close that still wants its answer)
    await asyncio.sleep(0.2)  # the edge has seen them go
    answers = await asyncio.gather(
        *(
            exchange(edge.port, request_bytes("GET", f"/?stayer={i}", host=HOST), timeout=30)
            for i in range(3)
        )
    )
    assert all(r is not None for r in answers), "a held request got no answer"
    assert [(r.status, r.header("X-Edge-Error")) for r in answers] == [(200, None)] * 3
