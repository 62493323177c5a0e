"""Wakes are not free for anyone: one client asking for many cold apps starts only its
share of wakes, through a real edge, the local control plane and the sample app."""

from __future__ import annotations

from typing import Any

import aiohttp
from helpers import eventually, metric_sum
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

APPS = [f"app{i}" for i in range(6)]


def cold(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "hosts": [f"{name}.localhost"],
        "scale_to_zero": True,
        "hold_timeout": "15s",
        "readiness_timeout": "10s",
    }


async def allocations(cp, app: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=cp.headers()) as api,
        api.get(f"{cp.url}/v1/allocations", params={"app": app}) as resp,
    ):
        return (await resp.json())["allocations"]


async def test_one_client_starts_only_its_share_of_wakes(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec(name) for name in APPS])
    edge = start_edge(
        apps=[cold(name) for name in APPS],
        sections={
            "control_plane": {"url": cp.url},
            "budget": {"client_wake_burst": 2, "client_wake_rate": 0.01},
        },
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )
    answers = []
    for name in APPS:  # unsafe requests: refused at once, yet each used to start a wake
        async with client.post(edge.url + "/", headers={"Host": f"{name}.localhost"}) as resp:
            answers.append((resp.status, resp.headers.get("X-Edge-Error")))
    assert answers[:2] == [(503, "not_safe_to_hold")] * 2
    assert answers[2:] == [(429, "wake_rate_limited")] * 4
    # Asking again for an app already waking joins its wake: free, not refused.
    async with client.get(edge.url + "/", headers={"Host": "app0.localhost"}) as resp:
        assert resp.status == 200
    woken = [name for name in APPS if await allocations(cp, name)]
    assert woken == ["app0", "app1"]

    def counted() -> bool:
        text = edge.metrics()
        return (
            metric_sum(text, "edge_wake_starts_total", by="refused_request") == 2
            and metric_sum(text, "edge_rejections_total", reason="wake_rate_limited") == 4
        )

    await eventually(counted, timeout=10, what="wake starts counted by kind")
