"""The gallery document as a plain function (edge/ops/gallery.py): no loop, no I/O.

Every number comes from the inputs: the Wake counters and the apps' states from the
store, the control plane's machines from its report, and null wherever a source never
answered or does not report a machine.
"""

from __future__ import annotations

import msgspec

from edge.ops.gallery import (
    AppInput,
    ControlPlaneData,
    ControlPlaneStatus,
    GalleryInputs,
    Sources,
    SourceStatus,
    StoreData,
    gallery_view,
    source_status,
    wake_failure_detail,
)
from edge.ops.gallery_feed import due, public_name, summary
from scheduler_client.machines import GALLERY
from scheduler_client.models import Allocation, MachineReport, MachinesReport
from wake import gallery_counts
from wake.budget import BudgetLimits, BudgetUsage
from wake.store.protocol import AppWakeState, Transition, WakePhases

NOW = 1_764_612_345.0
SOURCES = Sources(
    store=SourceStatus(name="redis://127.0.0.1:6380/0", ok=True),
    control_plane=ControlPlaneStatus(name="http://127.0.0.1:9400", ok=True),
)
APPS = [
    AppInput(name="hello", scale_to_zero=True, held=2, hot_here=True),
    AppInput(name="shop", tenant="acme", scale_to_zero=True, queue=True),
    AppInput(name="static", held=0),
]


def inputs(
    store: StoreData | None = None, control_plane: ControlPlaneData | None = None, **kw
) -> GalleryInputs:
    base = {
        "edge_id": "edge-ab12",
        "apps": APPS,
        "budget_limits": BudgetLimits(max_concurrent_wakes=20, tenant_max_concurrent_wakes=5),
        "counts_scope": "region",
        "store": store if store is not None else StoreData(),
        "control_plane": control_plane if control_plane is not None else ControlPlaneData(),
        "sources": SOURCES,
    }
    return GalleryInputs(**{**base, **kw})


def as_json(gallery) -> dict:
    return msgspec.json.decode(msgspec.json.encode(gallery))


def machine(doc: dict, name: str) -> dict:
    return next(m for m in doc["machines"] if m["name"] == name)


def by_id(items: list[dict]) -> dict[str, dict]:
    return {item["id"]: item for item in items}


def states(doc: dict, name: str) -> dict[str, int | None]:
    return {s["name"]: s["count"] for s in machine(doc, name)["states"]}


WAKE_STATES = {
    "hello": AppWakeState(
        app="hello",
        state="hot",
        reason="readiness passed",
        last_wake=WakePhases(at=NOW - 5, budget_ms=0.4, allocation_ms=1012.3, total_ms=1050.2),
    ),
    "shop": AppWakeState(app="shop"),
}


# ------------------------------------------------------------------ document shape


def test_the_document_has_the_schemas_keys_and_every_machine_in_gallery_order() -> None:
    doc = as_json(gallery_view(inputs(), NOW))
    assert list(doc) == [
        "generated_at",
        "edge_id",
        "sources",
        "machines",
        "apps",
        "budget",
        "transitions",
    ]
    assert (doc["generated_at"], doc["edge_id"]) == (NOW, "edge-ab12")
    assert [m["name"] for m in doc["machines"]] == list(GALLERY)
    assert [m["owner"] for m in doc["machines"]] == ["edge"] + ["control plane"] * 6
    wake = machine(doc, "wake")
    assert list(wake) == [
        "name",
        "title",
        "owner",
        "reported",
        "counts_scope",
        "states",
        "transitions",
        "gates",
        "failure_modes",
    ]
    assert wake["title"] == "Wake" and machine(doc, "host_drain")["title"] == (
        "Host Drain / OS Upgrade"
    )
    assert ["cold", "wake_requested"] in wake["transitions"]
    assert list(wake["gates"][0]) == [
        "id",
        "name",
        "description",
        "guards",
        "passed",
        "refused",
        "detected_by",
    ]
    assert list(wake["failure_modes"][0]) == [
        "id",
        "name",
        "description",
        "leads_to",
        "count",
        "detail",
        "detected_by",
    ]
    assert list(doc["sources"]["store"]) == ["name", "ok", "stale_since", "error"]
    assert list(doc["sources"]["control_plane"]) == [
        "name",
        "ok",
        "stale_since",
        "error",
        "configured",
    ]


def test_nothing_answered_yet_means_null_counts_and_unreported_machines() -> None:
    doc = as_json(gallery_view(inputs(), NOW))
    for m in doc["machines"]:
        assert m["reported"] is False, m["name"]
        assert all(s["count"] is None for s in m["states"])
        assert all(g["passed"] is None and g["refused"] is None for g in m["gates"])
        assert all(f["count"] is None and f["detail"] == "" for f in m["failure_modes"])
    hello = doc["apps"][0]
    assert hello["state"] is None and hello["allocations"] is None and hello["last_wake"] is None
    assert doc["apps"][1]["queued"] is None and doc["apps"][1]["dead_letters"] is None
    assert doc["budget"] == {
        "limit": 20,
        "tenant_limit": 5,
        "in_use": None,
        "waiting": None,
        "by_tenant": None,
    }
    assert doc["transitions"] == []


# ------------------------------------------------------------------ Wake


def test_wake_states_are_counted_over_the_scale_to_zero_apps() -> None:
    doc = as_json(gallery_view(inputs(StoreData(states=WAKE_STATES)), NOW))
    assert states(doc, "wake") == {
        "cold": 1,
        "wake_requested": 0,
        "starting": 0,
        "readiness_wait": 0,
        "hot": 1,
        "failed": 0,
        "sleeping": 0,
    }
    wake = machine(doc, "wake")
    assert wake["reported"] is True and wake["counts_scope"] == "region"
    # The counters did not answer: gates and failure modes stay null.
    assert all(g["passed"] is None for g in wake["gates"])


def test_wake_gates_and_failure_modes_come_from_the_region_wide_counters() -> None:
    counts = {
        gallery_counts.gate_passed("wake_budget_available"): 3,
        gallery_counts.gate_refused("wake_budget_available"): 2,
        gallery_counts.gate_refused("request_class_safe_to_hold"): 7,
        gallery_counts.failure("wake_stampede"): 4999,
        gallery_counts.WAKES: 1,
        gallery_counts.failure("payment_webhook_while_cold"): 12,
        gallery_counts.failure("payment_webhook_while_cold", "queued"): 9,
        gallery_counts.failure("payment_webhook_while_cold", "rejected"): 3,
        gallery_counts.failure("readiness_timeout"): 1,
    }
    doc = as_json(gallery_view(inputs(StoreData(counts=counts)), NOW))
    wake = machine(doc, "wake")
    assert wake["reported"] is True
    gates = by_id(wake["gates"])
    assert (
        gates["wake_budget_available"]["passed"],
        gates["wake_budget_available"]["refused"],
    ) == (
        3,
        2,
    )
    assert gates["request_class_safe_to_hold"] == {
        "id": "request_class_safe_to_hold",
        "name": "request class safe to hold",
        "description": gates["request_class_safe_to_hold"]["description"],
        "guards": "wake_requested",
        "passed": 0,  # a key the store lacks is 0 once the store answered
        "refused": 7,
        "detected_by": "",
    }
    modes = by_id(wake["failure_modes"])
    assert modes["wake_stampede"]["count"] == 4999
    assert modes["wake_stampede"]["detail"] == "4,999 requests coalesced into 1 wake"
    assert modes["payment_webhook_while_cold"]["count"] == 12
    assert modes["payment_webhook_while_cold"]["detail"] == "9 queued, 3 rejected"
    assert (modes["readiness_timeout"]["count"], modes["readiness_timeout"]["detail"]) == (1, "")
    assert modes["old_route_epoch"]["count"] == 0
    # The states did not answer: null counts, though the machine is reported.
    assert set(states(doc, "wake").values()) == {None}


def test_failure_details_use_thousands_separators_and_plurals() -> None:
    counts = {"failure:wake_stampede": 1_234_567, "wakes": 1200}
    assert (
        wake_failure_detail("wake_stampede", counts)
        == "1,234,567 requests coalesced into 1,200 wakes"
    )
    assert wake_failure_detail("wake_stampede", {}) == "0 requests coalesced into 0 wakes"
    assert wake_failure_detail("payment_webhook_while_cold", {}) == "0 queued, 0 rejected"
    assert wake_failure_detail("old_route_epoch", counts) == ""


def test_a_memory_store_counts_for_this_edge_only() -> None:
    doc = as_json(gallery_view(inputs(StoreData(counts={}), counts_scope="edge"), NOW))
    assert machine(doc, "wake")["counts_scope"] == "edge"


# ------------------------------------------------------------------ control plane

REPORT = MachinesReport(
    at=NOW,
    machines=[
        MachineReport(
            name="allocation",
            states={"ready": 1, "failed": 3, "stopped": 2},
            reasons={
                "secret_missing": 1,
                "build_digest_mismatch": 1,
                "runner_crash": 1,
                "health_readiness_pass": 2,
            },
            moves={
                "pulling->starting": 4,
                "starting->ready": 3,
                "ready->draining": 2,
                "draining->stopped": 2,
                "pulling->failed": 2,
            },
        ),
        MachineReport(name="promotion"),
        MachineReport(name="host_drain", states={"uncordoned": 1}),
        MachineReport(
            name="region",
            states={"eligible": 1},
            moves={"replicating_artifacts->eligible": 1, "disabled->eligible": 1},
        ),
    ],
)


def test_control_plane_machines_count_from_its_report() -> None:
    doc = as_json(gallery_view(inputs(control_plane=ControlPlaneData(report=REPORT)), NOW))
    alloc = machine(doc, "allocation")
    assert alloc["reported"] is True and alloc["owner"] == "control plane"
    assert states(doc, "allocation") == {
        "planned": 0,
        "pulling": 0,
        "starting": 0,
        "ready": 1,
        "draining": 0,
        "stopped": 2,
        "failed": 3,
    }
    gates = by_id(alloc["gates"])
    # Passed: moves into the guarded state; refused: rows naming the gate or its failure mode.
    assert (gates["env_secrets_mounted"]["passed"], gates["env_secrets_mounted"]["refused"]) == (
        4,
        1,
    )
    assert gates["artifact_digest_verified"]["refused"] == 1  # build digest mismatch
    assert (
        gates["health_readiness_pass"]["passed"],
        gates["health_readiness_pass"]["refused"],
    ) == (3, 2)
    drain = gates["drain_deadline_respected"]
    assert (drain["passed"], drain["refused"]) == (2, 0)
    modes = by_id(alloc["failure_modes"])
    assert {k: v["count"] for k, v in modes.items()} == {
        "runner_crash": 1,
        "secret_missing": 1,
        "oom": 0,
        "session_still_active_at_drain_deadline": 0,
        "build_digest_mismatch": 1,
        "old_route_epoch": 0,
    }
    region_gates = by_id(machine(doc, "region")["gates"])
    assert region_gates["secrets_present"]["passed"] == 2  # both moves into eligible
    assert region_gates["secrets_present"]["detected_by"] == "control plane"
    assert states(doc, "promotion") == dict.fromkeys(states(doc, "promotion"), 0)
    assert machine(doc, "promotion")["reported"] is True


def test_machines_the_report_lacks_are_not_reported() -> None:
    doc = as_json(gallery_view(inputs(control_plane=ControlPlaneData(report=REPORT)), NOW))
    for name in ("deploy_pipeline", "database_migration"):
        m = machine(doc, name)
        assert (m["reported"], m["owner"]) == (False, "control plane")
        assert set(states(doc, name).values()) == {None}
        assert all(g["passed"] is None and g["refused"] is None for g in m["gates"])
        assert all(g["detected_by"] == "control plane" for g in m["gates"])
    assert machine(doc, "deploy_pipeline")["title"] == "Deploy Pipeline"
    assert machine(doc, "database_migration")["states"][0] == {"name": "classified", "count": None}


# ------------------------------------------------------------------ apps, budget, journal


def test_apps_combine_store_holds_queues_and_live_allocations() -> None:
    allocations = [
        Allocation(id="hello-3", app="hello", state="ready", address="127.0.0.1:41234"),
        Allocation(id="hello-2", app="hello", state="stopped", address="127.0.0.1:41000"),
        Allocation(id="shop-1", app="shop", state="starting"),
    ]
    store = StoreData(states=WAKE_STATES, depths={"shop": (4, 1)})
    doc = as_json(
        gallery_view(inputs(store, ControlPlaneData(report=REPORT, allocations=allocations)), NOW)
    )
    hello, shop, static = doc["apps"]
    assert hello == {
        "name": "hello",
        "tenant": "default",
        "scale_to_zero": True,
        "state": "hot",
        "reason": "readiness passed",
        "held": 2,
        "queued": 0,
        "dead_letters": 0,
        "hot_here": True,
        "last_wake": {
            "at": NOW - 5,
            "budget_ms": 0.4,
            "allocation_ms": 1012.3,
            "readiness_ms": 0.0,
            "total_ms": 1050.2,
        },
        "allocations": [{"id": "hello-3", "state": "ready", "address": "127.0.0.1:41234"}],
    }
    assert (shop["state"], shop["tenant"], shop["queued"], shop["dead_letters"]) == (
        "cold",
        "acme",
        4,
        1,
    )
    assert shop["allocations"] == [{"id": "shop-1", "state": "starting", "address": ""}]
    assert shop["hot_here"] is False and shop["last_wake"] is None
    # An app that never scales to zero is always hot, here too.
    assert (static["state"], static["hot_here"], static["allocations"]) == ("hot", True, [])


def test_budget_is_null_without_scale_to_zero_apps_and_filled_from_usage() -> None:
    usage = BudgetUsage(in_use=1, waiting=2, tokens=3.0, by_tenant={"default": 1})
    doc = as_json(gallery_view(inputs(StoreData(budget=usage)), NOW))
    assert doc["budget"] == {
        "limit": 20,
        "tenant_limit": 5,
        "in_use": 1,
        "waiting": 2,
        "by_tenant": {"default": 1},
    }
    assert as_json(gallery_view(inputs(budget_limits=None), NOW))["budget"] is None


def test_transitions_are_the_newest_hundred_newest_first() -> None:
    journal = [
        Transition(
            app="hello",
            from_state="cold",
            to_state="wake_requested",
            reason=f"#{i}",
            edge_id="e",
            at=float(i),
        )
        for i in range(150)
    ]
    doc = as_json(gallery_view(inputs(StoreData(transitions=journal)), NOW))
    rows = doc["transitions"]
    assert len(rows) == 100
    assert [r["at"] for r in rows] == [float(i) for i in range(149, 49, -1)]
    assert rows[0] == {
        "at": 149.0,
        "machine": "wake",
        "app": "hello",
        "from_state": "cold",
        "to_state": "wake_requested",
        "reason": "#149",
        "reason_code": "",
        "edge_id": "e",
    }


# ------------------------------------------------------------------ sources


def test_source_status_marks_the_first_failure_keeps_it_and_clears_on_an_answer() -> None:
    status = SourceStatus(name="redis://h:1/0", ok=True)
    failed = source_status(status, ok=False, error="connection refused", now=100.0)
    assert (failed.ok, failed.stale_since, failed.error) == (False, 100.0, "connection refused")
    still = source_status(failed, ok=False, error="timed out", now=105.0)
    assert (still.ok, still.stale_since, still.error) == (False, 100.0, "timed out")
    back = source_status(still, ok=True, error="", now=110.0)
    assert (back.ok, back.stale_since, back.error) == (True, None, "")
    again = source_status(back, ok=False, error="down", now=120.0)
    assert again.stale_since == 120.0
    assert back.name == "redis://h:1/0"


def test_the_control_plane_status_keeps_its_configured_flag() -> None:
    status = ControlPlaneStatus(name="http://cp", ok=True, configured=True)
    failed = source_status(status, ok=False, error="refused", now=1.0)
    assert isinstance(failed, ControlPlaneStatus) and failed.configured is True


def test_the_control_plane_is_asked_at_most_once_per_interval() -> None:
    assert due(None, 5.0, 1.0)
    assert not due(5.0, 5.5, 1.0)
    assert due(5.0, 6.0, 1.0)


def test_source_names_carry_no_credentials() -> None:
    assert public_name("redis://:s3cret@10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
    assert public_name("redis://user:pw@h:1/0?password=x") == "redis://h:1/0"
    assert public_name("memory://") == "memory://"
    assert public_name("http://127.0.0.1:9400") == "http://127.0.0.1:9400"


def test_a_source_error_says_a_shared_message_once() -> None:
    assert summary({}) == ""
    assert summary({"counts": "no answer in 1s", "states": "no answer in 1s"}) == (
        "no answer in 1s"
    )
    assert summary({"counts": "no answer in 1s", "budget": "NOSCRIPT"}) == (
        "counts: no answer in 1s; budget: NOSCRIPT"
    )
