"""Every control-plane machine: exactly the designed moves, gates and failure modes in use,
and the one move mechanism (`machine_move`). No I/O.

Deploy pipeline and database migration are declared for the gallery only: a real control
plane drives them, the local one never does."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import msgspec
import pytest

import scheduler_client
from scheduler_client.machine_move import JournalEntry, plan_create, plan_event, plan_move
from scheduler_client.machine_spec import CONTROL_PLANE, IllegalTransition, MachineSpec, identifier
from scheduler_client.machines import (
    ALLOCATION,
    CONTROL_PLANE_MACHINES,
    DATABASE_MIGRATION,
    DEPLOY_PIPELINE,
    GALLERY,
    HOST_DRAIN,
    MACHINES,
    PROMOTION,
    REGION,
)
from scheduler_client.models import Allocation, Promotion
from wake.machine import WAKE

GALLERY_STATES = {
    "allocation": ("planned", "pulling", "starting", "ready", "draining", "stopped", "failed"),
    "host_drain": (
        "cordoned",
        "evacuating",
        "replacement_ready",
        "upgrading",
        "postcheck",
        "uncordoned",
    ),
    "promotion": (
        "requested",
        "policy_check",
        "route_cas",
        "edge_propagating",
        "healthy",
        "rolled_back",
        "failed",
    ),
    "region": (
        "requested",
        "provisioning",
        "binding_services",
        "replicating_artifacts",
        "eligible",
        "disabled",
    ),
    "deploy_pipeline": (
        "queued",
        "cloning",
        "building",
        "validating",
        "preview_ready",
        "blocked",
        "failed",
    ),
    "database_migration": (
        "classified",
        "dry_run",
        "locked",
        "applying",
        "verified",
        "blocked",
        "failed",
    ),
}
# Machines a real control plane drives and the local one does not.
NOT_RUN_LOCALLY = ("deploy_pipeline", "database_migration")


@pytest.mark.parametrize("name", sorted(GALLERY_STATES))
def test_states_are_exactly_the_gallerys(name: str) -> None:
    assert CONTROL_PLANE_MACHINES[name].states == GALLERY_STATES[name]


def test_the_gallery_lists_all_seven_machines_once_wake_first() -> None:
    assert (
        WAKE.name,
        "allocation",
        "promotion",
        "host_drain",
        "region",
        "deploy_pipeline",
        "database_migration",
    ) == GALLERY
    assert GALLERY[1:] == tuple(CONTROL_PLANE_MACHINES)
    assert set(CONTROL_PLANE_MACHINES) == set(MACHINES) | set(NOT_RUN_LOCALLY)
    assert not set(MACHINES) & set(NOT_RUN_LOCALLY)
    titles = [spec.title for spec in (WAKE, *CONTROL_PLANE_MACHINES.values())]
    assert titles == [
        "Wake",
        "Allocation Lifecycle",
        "Production Promotion",
        "Host Drain / OS Upgrade",
        "Region Enablement",
        "Deploy Pipeline",
        "Database Migration",
    ]


def _to(target: str, *sources: str) -> set[tuple[str, str]]:
    return {(source, target) for source in sources}


# The moves each machine must allow, written out from the gallery and DESIGN.md §2
# (never read from machines.py): a wrong table fails here.
EXPECTED_MOVES: dict[str, set[tuple[str, str]]] = {
    "allocation": {
        ("planned", "pulling"),
        ("pulling", "starting"),
        ("starting", "ready"),
        ("ready", "draining"),
        ("draining", "stopped"),
        # Stopping an allocation that never became ready still drains it.
        *_to("draining", "planned", "pulling", "starting"),
        # Any -> failed; stopped and failed are final.
        *_to("failed", "planned", "pulling", "starting", "ready", "draining"),
    },
    "host_drain": {
        ("uncordoned", "cordoned"),
        ("cordoned", "evacuating"),
        ("evacuating", "replacement_ready"),
        ("replacement_ready", "upgrading"),
        ("upgrading", "postcheck"),
        ("postcheck", "uncordoned"),
        # An operator may uncordon before the upgrade starts.
        *_to("uncordoned", "cordoned", "evacuating"),
    },
    "promotion": {
        ("requested", "policy_check"),
        ("policy_check", "route_cas"),
        ("route_cas", "edge_propagating"),
        ("edge_propagating", "healthy"),
        ("edge_propagating", "rolled_back"),
        # Any -> failed; healthy, rolled_back and failed are final.
        *_to("failed", "requested", "policy_check", "route_cas", "edge_propagating"),
    },
    "region": {
        ("requested", "provisioning"),
        ("provisioning", "binding_services"),
        ("binding_services", "replicating_artifacts"),
        ("replicating_artifacts", "eligible"),
        # Any -> disabled, and a disabled region can be enabled again.
        *_to(
            "disabled",
            "requested",
            "provisioning",
            "binding_services",
            "replicating_artifacts",
            "eligible",
        ),
        ("disabled", "eligible"),
    },
    "deploy_pipeline": {
        ("queued", "cloning"),
        ("cloning", "building"),
        ("building", "validating"),
        ("validating", "preview_ready"),
        # Cold deploy needs approval, migration blocks preview; unblocked, validated again.
        ("validating", "blocked"),
        ("blocked", "validating"),
        # Any -> failed; preview_ready and failed are final.
        *_to("failed", "queued", "cloning", "building", "validating", "blocked"),
    },
    "database_migration": {
        ("classified", "dry_run"),
        ("dry_run", "locked"),
        ("locked", "applying"),
        ("applying", "verified"),
        # Destructive migration, old app incompatible: blocked until classified again.
        *_to("blocked", "classified", "dry_run"),
        ("blocked", "classified"),
        # Any -> failed; verified and failed are final.
        *_to("failed", "classified", "dry_run", "locked", "applying", "blocked"),
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MOVES))
def test_the_table_allows_exactly_the_expected_moves(name: str) -> None:
    spec = CONTROL_PLANE_MACHINES[name]
    allowed = set(spec.all_moves())
    refused_but_expected = sorted(EXPECTED_MOVES[name] - allowed)
    allowed_but_unexpected = sorted(allowed - EXPECTED_MOVES[name])
    assert (refused_but_expected, allowed_but_unexpected) == ([], [])


@pytest.mark.parametrize(
    ("name", "move"),
    [(name, move) for name, moves in sorted(EXPECTED_MOVES.items()) for move in sorted(moves)],
    ids=lambda v: v if isinstance(v, str) else f"{v[0]}->{v[1]}",
)
def test_every_allowed_move_passes_check(name: str, move: tuple[str, str]) -> None:
    CONTROL_PLANE_MACHINES[name].check(*move)


@pytest.mark.parametrize("name", sorted(EXPECTED_MOVES))
def test_every_other_move_is_refused(name: str) -> None:
    spec = CONTROL_PLANE_MACHINES[name]
    for move in itertools.product(GALLERY_STATES[name], repeat=2):
        if move not in EXPECTED_MOVES[name]:
            with pytest.raises(IllegalTransition):
                spec.check(*move)


@pytest.mark.parametrize("spec", list(CONTROL_PLANE_MACHINES.values()), ids=lambda s: s.name)
def test_every_state_is_reachable_from_initial(spec: MachineSpec) -> None:
    seen = {spec.initial}
    frontier = [spec.initial]
    while frontier:
        for target in spec.allowed(frontier.pop()):
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(spec.states)


@pytest.mark.parametrize(
    ("spec", "current", "target"),
    [
        (ALLOCATION, "planned", "ready"),
        (ALLOCATION, "stopped", "ready"),
        (ALLOCATION, "failed", "planned"),
        (ALLOCATION, "ready", "starting"),
        (HOST_DRAIN, "uncordoned", "upgrading"),
        (PROMOTION, "requested", "healthy"),
        (PROMOTION, "healthy", "failed"),
        (REGION, "requested", "eligible"),
        (REGION, "eligible", "nonsense"),
        (DEPLOY_PIPELINE, "queued", "preview_ready"),
        (DEPLOY_PIPELINE, "preview_ready", "failed"),
        (DATABASE_MIGRATION, "dry_run", "applying"),
        (DATABASE_MIGRATION, "verified", "blocked"),
    ],
)
def test_illegal_moves_raise(spec: MachineSpec, current: str, target: str) -> None:
    with pytest.raises(IllegalTransition) as info:
        spec.check(current, target)
    assert info.value.machine == spec.name
    assert f"{current} -> {target}" in str(info.value)


def test_happy_paths_walk_in_order() -> None:
    for spec, path in (
        (ALLOCATION, ["planned", "pulling", "starting", "ready", "draining", "stopped"]),
        (PROMOTION, ["requested", "policy_check", "route_cas", "edge_propagating", "healthy"]),
        (
            HOST_DRAIN,
            [
                "uncordoned",
                "cordoned",
                "evacuating",
                "replacement_ready",
                "upgrading",
                "postcheck",
                "uncordoned",
            ],
        ),
        (
            REGION,
            ["requested", "provisioning", "binding_services", "replicating_artifacts", "eligible"],
        ),
        (
            DEPLOY_PIPELINE,
            ["queued", "cloning", "building", "validating", "blocked", "validating"],
        ),
        (DEPLOY_PIPELINE, ["validating", "preview_ready"]),
        (DATABASE_MIGRATION, ["classified", "dry_run", "locked", "applying", "verified"]),
    ):
        for current, target in itertools.pairwise(path):
            spec.check(current, target)


def test_gates_and_failure_modes_are_named_data() -> None:
    assert ALLOCATION.failure_mode("runner crash").leads_to == "failed"
    assert ALLOCATION.failure_mode("runner_crash").name == "runner crash"
    assert PROMOTION.gate("route epoch predecessor current").guards == "edge_propagating"
    assert PROMOTION.refusal("route_epoch_predecessor_current").id == "route_epoch_conflict"
    assert PROMOTION.refusal("approval_present_if_required").id == "approval_present_if_required"
    with pytest.raises(KeyError):
        REGION.gate("no such gate")
    with pytest.raises(KeyError):
        REGION.reason("no_such_reason")


# ------------------------------------------------- gates and failure modes in use

# Every id, pinned: the code and the operators' dashboards rely on them.
EXPECTED_IDS = {
    "allocation": (
        "artifact_digest_verified",
        "env_secrets_mounted",
        "health_readiness_pass",
        "drain_deadline_respected",
        "runner_crash",
        "secret_missing",
        "oom",
        "session_still_active_at_drain_deadline",
        "build_digest_mismatch",
        "old_route_epoch",
    ),
    "host_drain": (
        "quorum_remains_healthy",
        "runner_headroom_exists",
        "active_sessions_can_drain",
        "drift_checks_pass",
        "no_headroom",
        "active_sessions_pinned",
        "provider_outage",
        "runner_agent_regression",
    ),
    "promotion": (
        "preview_artifact_exactly_matches",
        "route_epoch_predecessor_current",
        "approval_present_if_required",
        "runtime_services_ready",
        "late_worker_report",
        "route_epoch_conflict",
        "edge_replay_gap",
        "db_rollback_unsafe",
    ),
    "region": (
        "data_topology_ready",
        "runtime_services_available",
        "secrets_present",
        "residency_allowed",
        "artifact_absent",
        "db_not_replicated",
        "session_store_missing",
        "residency_policy_violation",
    ),
    "deploy_pipeline": (
        "generated_artifacts_current",
        "vango_state_impact_classified",
        "db_impact_classified",
        "secrets_providers_bound",
        "stale_artifacts",
        "build_digest_mismatch",
        "cold_deploy_needs_approval",
        "migration_blocks_preview",
    ),
    "database_migration": (
        "expand_contract_safe",
        "backup_pitr_posture_known",
        "old_artifact_compatibility_checked",
        "rollback_plan_explicit",
        "destructive_migration",
        "old_app_incompatible",
        "preview_mutates_production",
        "manual_lock_timeout",
    ),
}
PACKAGE = Path(scheduler_client.__file__).parent
DECLARATIONS = {PACKAGE / "machines.py", PACKAGE / "machine_spec.py"}


def _strings_in_use() -> set[str]:
    """Every string literal in scheduler_client's code, outside the machine declarations."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path in DECLARATIONS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


@pytest.mark.parametrize("name", sorted(CONTROL_PLANE_MACHINES))
def test_gate_and_failure_mode_ids_are_the_gallery_names(name: str) -> None:
    spec = CONTROL_PLANE_MACHINES[name]
    items = (*spec.gates, *spec.failure_modes)
    assert tuple(item.id for item in items) == EXPECTED_IDS[name]
    assert all(item.id == identifier(item.name) for item in items)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_every_gate_and_failure_mode_is_detected_or_marked_for_the_control_plane(
    name: str,
) -> None:
    """Each id the code must report is in use; each marked one is honestly not.

    A gate and the failure mode that names its refusal (`FailureMode.gate`) are one
    check: the code reports the refusal as the failure mode (`MachineSpec.refusal`),
    so either id in use counts for both.
    """
    spec = MACHINES[name]
    used = _strings_in_use()
    in_use = {item.id for item in (*spec.gates, *spec.failure_modes) if item.id in used}
    for mode in spec.failure_modes:
        if mode.gate and {mode.id, mode.gate} & in_use:
            in_use |= {mode.id, mode.gate}
    unmarked = {i.id for i in (*spec.gates, *spec.failure_modes) if i.detected_by == ""}
    marked = {i.id for i in (*spec.gates, *spec.failure_modes) if i.detected_by == CONTROL_PLANE}
    assert unmarked | marked == set(EXPECTED_IDS[name]), "detected_by is '' or CONTROL_PLANE"
    assert sorted(unmarked - in_use) == [], "declared but never reported by scheduler_client"
    assert sorted(marked & in_use) == [], "marked for the control plane but reported here"


@pytest.mark.parametrize("name", NOT_RUN_LOCALLY)
def test_machines_not_run_locally_are_all_the_control_planes_and_never_named_here(
    name: str,
) -> None:
    spec = CONTROL_PLANE_MACHINES[name]
    assert all(item.detected_by == CONTROL_PLANE for item in (*spec.gates, *spec.failure_modes))
    # No code of the local control plane (or the client) moves or reports it.
    assert name not in _strings_in_use()


# ------------------------------------------------------------ the move mechanism


def _alloc(state: str = "starting", **fields: object) -> Allocation:
    record = Allocation(id="a-1", app="hello", state="planned", version=3)
    return msgspec.structs.replace(record, state=state, **fields)


def test_plan_move_checks_and_returns_the_record_and_its_journal_entry() -> None:
    before = _alloc(reason="old")
    move = plan_move(
        ALLOCATION,
        before,
        "ready",
        subject="a-1",
        now=12.5,
        reason="readiness passed",
        routed=True,
    )
    assert move.record == msgspec.structs.replace(
        before, state="ready", reason="readiness passed", version=4, updated_at=12.5, routed=True
    )
    assert move.entry == JournalEntry(
        machine="allocation",
        subject="a-1",
        from_state="starting",
        to_state="ready",
        reason="readiness passed",
        at=12.5,
    )
    assert before.state == "starting" and before.version == 3  # nothing mutated


def test_plan_move_refuses_an_illegal_move_and_an_undeclared_reason_code() -> None:
    with pytest.raises(IllegalTransition):
        plan_move(ALLOCATION, _alloc("stopped"), "ready", subject="a-1", now=0.0)
    with pytest.raises(KeyError, match="no_such_code"):
        plan_move(
            ALLOCATION, _alloc(), "failed", subject="a-1", now=0.0, reason_code="no_such_code"
        )
    failed = plan_move(
        ALLOCATION,
        _alloc(),
        "failed",
        subject="a-1",
        now=0.0,
        reason="crash",
        reason_code="runner_crash",
    )
    assert (failed.record.reason_code, failed.entry.reason_code) == ("runner_crash", "runner_crash")


def test_a_record_without_version_moves_without_one() -> None:
    promotion = Promotion(id="p-1", app="hello", allocation_id="a-1", state="requested")
    move = plan_move(PROMOTION, promotion, "policy_check", subject="p-1", now=1.0)
    assert "version" not in Promotion.__struct_fields__
    assert (move.record.state, move.record.updated_at) == ("policy_check", 1.0)


def test_plan_event_keeps_the_state_and_optionally_the_reason() -> None:
    alloc = _alloc("ready", reason="kept")
    event = plan_event(
        ALLOCATION,
        alloc,
        subject="a-1",
        now=2.0,
        reason="old route epoch",
        reason_code="old_route_epoch",
    )
    assert (event.entry.from_state, event.entry.to_state) == ("ready", "ready")
    assert (event.record.state, event.record.reason, event.record.version) == (
        "ready",
        "old route epoch",
        4,
    )
    quiet = plan_event(
        ALLOCATION,
        alloc,
        subject="a-1",
        now=2.0,
        reason="late",
        reason_code="old_route_epoch",
        record_reason=False,
    )
    assert (quiet.record.reason, quiet.entry.reason) == ("kept", "late")
    assert (quiet.record.reason_code, quiet.entry.reason_code) == ("", "old_route_epoch")


def test_plan_create_journals_the_initial_state_only() -> None:
    move = plan_create(ALLOCATION, _alloc("planned"), subject="a-1", now=0.0, reason="created")
    assert (move.entry.from_state, move.entry.to_state) == ("", "planned")
    with pytest.raises(ValueError, match="must start planned"):
        plan_create(ALLOCATION, _alloc("ready"), subject="a-1", now=0.0)


def test_a_spec_naming_unknown_states_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown states"):
        MachineSpec(name="bad", states=("a",), initial="a", transitions=(("a", "b"),))
