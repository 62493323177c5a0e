"""GET /v1/machines of the real local control plane: instances per state now, journal rows
per reason_code and moves per "from->to", for each machine it drives, through the client."""

from __future__ import annotations

import pytest
from controlplane_client import app

from scheduler_client.client import ControlPlaneClient
from scheduler_client.machines import MACHINES
from scheduler_client.models import MachinesReport

pytestmark = pytest.mark.timeout(90)


async def report_of(cp) -> MachinesReport:
    async with ControlPlaneClient(cp.url, cp.token, timeout=5.0) as client:
        return await client.machine_report()


async def test_a_fresh_control_plane_reports_its_host_and_region(api_for) -> None:
    api = api_for([app("hello")])
    report = await report_of(api.cp)
    by_name = {m.name: m for m in report.machines}
    assert list(by_name) == ["allocation", "promotion", "host_drain", "region"]
    assert set(by_name) == set(MACHINES)  # deploy pipeline and migration: not run here
    assert by_name["allocation"].states == {} and by_name["promotion"].states == {}
    assert by_name["host_drain"].states == {"uncordoned": 1}
    assert by_name["region"].states == {"eligible": 1}
    assert by_name["region"].moves == {
        "requested->provisioning": 1,
        "provisioning->binding_services": 1,
        "binding_services->replicating_artifacts": 1,
        "replicating_artifacts->eligible": 1,
    }
    assert all(m.reasons == {} for m in report.machines)
    assert report.at > 0


async def test_states_reasons_and_moves_follow_what_happened(api_for) -> None:
    api = api_for(
        [
            app("hello"),
            app("tampered", digest="sha256:" + "0" * 64),
            app("secretive", secrets=["NOT_SET_ANYWHERE"]),
        ]
    )
    ready = await api.ready("hello")
    for name in ("tampered", "secretive"):
        alloc = await api.create(name)
        await api.alloc_until(alloc["id"], "failed")
    stopped = await api.ready("hello")
    await api.ok("POST", f"/v1/allocations/{stopped['id']}/stop")
    await api.alloc_until(stopped["id"], "stopped")

    report = await report_of(api.cp)
    allocation = next(m for m in report.machines if m.name == "allocation")
    assert allocation.states == {"ready": 1, "failed": 2, "stopped": 1}
    assert allocation.reasons == {"build_digest_mismatch": 1, "secret_missing": 1}
    assert allocation.moves["starting->ready"] == 2
    assert allocation.moves["pulling->failed"] == 2
    assert allocation.moves["ready->draining"] == 1
    assert allocation.moves["draining->stopped"] == 1
    # A creation is no move: nothing "->planned".
    assert all(not key.startswith("->") for key in allocation.moves)
    # The raw answer is the same document (what the openapi schema describes).
    body = await api.ok("GET", "/v1/machines")
    assert {m["name"] for m in body["machines"]} == set(MACHINES)
    assert next(m for m in body["machines"] if m["name"] == "allocation")["states"]["ready"] == 1
    assert ready["state"] == "ready"


async def test_a_gate_refused_without_a_move_is_counted_by_its_id(api_for) -> None:
    # One allocation and replace=True: no headroom on the only host (an event, no move).
    api = api_for([app("hello")])
    await api.ready("hello")
    await api.ok("POST", "/v1/hosts/local/cordon")
    await api.ok("POST", "/v1/hosts/local/drain", {"deadline_s": 0, "replace": True})
    await api.until(
        lambda: api.host("local"),
        lambda h: h["reason_code"] == "no_headroom",
        "the drain to report no headroom",
    )
    report = await report_of(api.cp)
    host = next(m for m in report.machines if m.name == "host_drain")
    assert host.states == {"evacuating": 1}
    assert host.reasons == {"no_headroom": 1}
    assert host.moves == {"uncordoned->cordoned": 1, "cordoned->evacuating": 1}
