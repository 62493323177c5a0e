"""The control plane's machines from the state-machine gallery, each declared once.

States come from the wire models' Literals (`models.py`), so the OpenAPI enums,
the decoders and these tables cannot disagree. Each gate and failure mode has an
id (snake_case of its name) that the local control plane reports as a
`reason_code`; those only a real control plane detects are marked
`detected_by=CONTROL_PLANE` (tests/test_machines.py holds both lists to account).
Deploy pipeline and database migration are the control plane's too, but only a
real one drives them: they are declared for the gallery, outside `MACHINES`.
"""

from __future__ import annotations

from typing import get_args

from scheduler_client.machine_spec import CONTROL_PLANE, FailureMode, Gate, MachineSpec
from scheduler_client.models import AllocationState, HostState, PromotionState, RegionState

ALLOCATION = MachineSpec(
    name="allocation",
    title="Allocation Lifecycle",
    states=get_args(AllocationState),
    initial="planned",
    transitions=(
        ("planned", "pulling"),
        ("pulling", "starting"),
        ("starting", "ready"),
        ("ready", "draining"),
        # Stopping an allocation that never became ready still drains it.
        ("planned", "draining"),
        ("pulling", "draining"),
        ("starting", "draining"),
        ("draining", "stopped"),
    ),
    terminal=("stopped", "failed"),
    from_any=("failed",),
    gates=(
        Gate("artifact digest verified", "starting", "the artifact's sha256 equals the digest"),
        Gate("env/secrets mounted", "starting", "every declared secret is present"),
        Gate("health/readiness pass", "ready", "the readiness path answered 2xx"),
        Gate("drain deadline respected", "stopped", "in-flight work ended by the deadline"),
    ),
    failure_modes=(
        FailureMode("runner crash", "failed", "the app process exited on its own"),
        FailureMode(
            "secret missing",
            "failed",
            "a declared secret is not in the environment",
            gate="env_secrets_mounted",
        ),
        FailureMode("OOM", "failed", "the process exceeded its memory limit"),
        FailureMode(
            "session still active at drain deadline",
            "stopped",
            "a long-lived session was cut at the drain deadline",
            gate="drain_deadline_respected",
        ),
        # Not in the gallery's allocation list: the deploy pipeline's name for the same check.
        FailureMode(
            "build digest mismatch",
            "failed",
            "the artifact's sha256 differs",
            gate="artifact_digest_verified",
        ),
        # The Wake machine's failure mode, seen from the allocation: ready, never routed.
        FailureMode(
            "old route epoch",
            "ready",
            "granted under a route epoch a promotion has since replaced; not routed",
        ),
    ),
)

HOST_DRAIN = MachineSpec(
    name="host_drain",
    title="Host Drain / OS Upgrade",
    states=get_args(HostState),
    initial="uncordoned",
    transitions=(
        ("uncordoned", "cordoned"),
        ("cordoned", "evacuating"),
        ("cordoned", "uncordoned"),
        ("evacuating", "replacement_ready"),
        ("evacuating", "uncordoned"),
        ("replacement_ready", "upgrading"),
        ("upgrading", "postcheck"),
        ("postcheck", "uncordoned"),
    ),
    gates=(
        Gate(
            "quorum remains healthy",
            "evacuating",
            "enough ready capacity stays elsewhere",
            detected_by=CONTROL_PLANE,  # one local host: no quorum to lose
        ),
        Gate("runner headroom exists", "replacement_ready", "replacements fit somewhere"),
        Gate("active sessions can drain", "replacement_ready", "no session is pinned"),
        Gate("drift checks pass", "uncordoned", "the host matches its declared state"),
    ),
    failure_modes=(
        FailureMode(
            "no headroom",
            "evacuating",
            "no capacity for the replacements",
            gate="runner_headroom_exists",
        ),
        FailureMode(
            "active sessions pinned",
            "evacuating",
            "sessions that cannot move",
            gate="active_sessions_can_drain",
        ),
        FailureMode(
            "provider outage",
            "upgrading",
            "the provider failed the upgrade",
            detected_by=CONTROL_PLANE,  # the local upgrade step has no provider
        ),
        FailureMode(
            "runner-agent regression",
            "postcheck",
            "the new runner failed checks",
            detected_by=CONTROL_PLANE,  # the local runner is never replaced
        ),
    ),
)

PROMOTION = MachineSpec(
    name="promotion",
    title="Production Promotion",
    states=get_args(PromotionState),
    initial="requested",
    transitions=(
        ("requested", "policy_check"),
        ("policy_check", "route_cas"),
        ("route_cas", "edge_propagating"),
        ("edge_propagating", "healthy"),
        ("edge_propagating", "rolled_back"),
    ),
    terminal=("healthy", "rolled_back", "failed"),
    from_any=("failed",),
    gates=(
        Gate("preview artifact exactly matches", "route_cas", "target allocation's digest"),
        Gate("route epoch predecessor current", "edge_propagating", "CAS on the app's epoch"),
        Gate("approval present if required", "route_cas", "an approval call was made"),
        Gate("runtime services ready", "route_cas", "the target allocation is ready"),
    ),
    failure_modes=(
        FailureMode("late worker report", "healthy", "an ack after the promotion ended"),
        FailureMode(
            "route epoch conflict",
            "failed",
            "the predecessor epoch was not current",
            gate="route_epoch_predecessor_current",
        ),
        FailureMode("edge replay gap", "rolled_back", "an edge did not ack in time"),
        FailureMode(
            "DB rollback unsafe",
            "failed",
            "rollback would lose data",
            detected_by=CONTROL_PLANE,  # the local control plane has no databases
        ),
    ),
)

REGION = MachineSpec(
    name="region",
    title="Region Enablement",
    states=get_args(RegionState),
    initial="requested",
    transitions=(
        ("requested", "provisioning"),
        ("provisioning", "binding_services"),
        ("binding_services", "replicating_artifacts"),
        ("replicating_artifacts", "eligible"),
        ("disabled", "eligible"),
    ),
    from_any=("disabled",),
    # The local region is one machine: only its artifacts are checked at bring-up.
    gates=(
        Gate(
            "data topology ready",
            "binding_services",
            "databases placed",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "runtime services available",
            "replicating_artifacts",
            "runners up",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "secrets present",
            "eligible",
            "every app's secrets replicated",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "residency allowed",
            "eligible",
            "the region may hold the data",
            detected_by=CONTROL_PLANE,
        ),
    ),
    failure_modes=(
        FailureMode("artifact absent", "disabled", "an artifact is not replicated"),
        FailureMode(
            "DB not replicated",
            "disabled",
            "a database is not replicated",
            detected_by=CONTROL_PLANE,
        ),
        FailureMode(
            "session store missing", "disabled", "no session store", detected_by=CONTROL_PLANE
        ),
        FailureMode(
            "residency policy violation",
            "disabled",
            "data may not live here",
            detected_by=CONTROL_PLANE,
        ),
    ),
)

# The machines the local control plane drives (and reports in GET /v1/machines).
MACHINES = {spec.name: spec for spec in (ALLOCATION, HOST_DRAIN, PROMOTION, REGION)}

# ------------------------------------------------ owned by the control plane, not run here
# A real control plane drives these; the local one never does (nothing in
# scheduler_client/local moves them), so every gate and failure mode is CONTROL_PLANE.
# They are declared so the gallery page shows every machine of the design.

DEPLOY_PIPELINE = MachineSpec(
    name="deploy_pipeline",
    title="Deploy Pipeline",
    states=("queued", "cloning", "building", "validating", "preview_ready", "blocked", "failed"),
    initial="queued",
    transitions=(
        ("queued", "cloning"),
        ("cloning", "building"),
        ("building", "validating"),
        ("validating", "preview_ready"),
        ("validating", "blocked"),
        # An approval given, or the migration that blocked it done: validated again.
        ("blocked", "validating"),
    ),
    terminal=("preview_ready", "failed"),
    from_any=("failed",),
    gates=(
        Gate(
            "generated artifacts current",
            "building",
            "generated code matches its sources before the build",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "Vango state impact classified",
            "validating",
            "the change's effect on live app state is known",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "DB impact classified",
            "validating",
            "the change's schema and data effects are known",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "secrets/providers bound",
            "preview_ready",
            "every secret and provider the preview needs is bound",
            detected_by=CONTROL_PLANE,
        ),
    ),
    failure_modes=(
        FailureMode(
            "stale artifacts",
            "failed",
            "generated artifacts older than their sources",
            detected_by=CONTROL_PLANE,
            gate="generated_artifacts_current",
        ),
        FailureMode(
            "build digest mismatch",
            "failed",
            "the built artifact's digest differs from the recorded one",
            detected_by=CONTROL_PLANE,
        ),
        FailureMode(
            "cold deploy needs approval",
            "blocked",
            "a deploy that would start cold waits for an approval",
            detected_by=CONTROL_PLANE,
        ),
        FailureMode(
            "migration blocks preview",
            "blocked",
            "a pending database migration must finish first",
            detected_by=CONTROL_PLANE,
        ),
    ),
)

DATABASE_MIGRATION = MachineSpec(
    name="database_migration",
    title="Database Migration",
    states=("classified", "dry_run", "locked", "applying", "verified", "blocked", "failed"),
    initial="classified",
    transitions=(
        ("classified", "dry_run"),
        ("dry_run", "locked"),
        ("locked", "applying"),
        ("applying", "verified"),
        ("classified", "blocked"),
        ("dry_run", "blocked"),
        # Rewritten (say, split into expand and contract): classified again.
        ("blocked", "classified"),
    ),
    terminal=("verified", "failed"),
    from_any=("failed",),
    gates=(
        Gate(
            "expand/contract safe",
            "dry_run",
            "old and new code both work on every intermediate schema",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "backup/PITR posture known",
            "locked",
            "a restore point exists from before the lock",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "old artifact compatibility checked",
            "applying",
            "the running artifact works on the new schema",
            detected_by=CONTROL_PLANE,
        ),
        Gate(
            "rollback plan explicit",
            "applying",
            "the way back is written down before applying",
            detected_by=CONTROL_PLANE,
        ),
    ),
    failure_modes=(
        FailureMode(
            "destructive migration",
            "blocked",
            "drops or rewrites data old code still reads",
            detected_by=CONTROL_PLANE,
            gate="expand_contract_safe",
        ),
        FailureMode(
            "old app incompatible",
            "blocked",
            "the running artifact fails on the new schema",
            detected_by=CONTROL_PLANE,
            gate="old_artifact_compatibility_checked",
        ),
        FailureMode(
            "preview mutates production",
            "failed",
            "a preview's migration would write production data",
            detected_by=CONTROL_PLANE,
        ),
        FailureMode(
            "manual lock timeout",
            "failed",
            "the lock was held past its deadline",
            detected_by=CONTROL_PLANE,
        ),
    ),
)

# Every machine the control plane owns, driven here or not.
CONTROL_PLANE_MACHINES = {
    spec.name: spec
    for spec in (ALLOCATION, PROMOTION, HOST_DRAIN, REGION, DEPLOY_PIPELINE, DATABASE_MIGRATION)
}

# The gallery page's order: the edge's Wake machine (wake/machine.py), then the control plane's.
GALLERY = ("wake", *CONTROL_PLANE_MACHINES)
