"""The control plane's machines from the state-machine gallery, each declared once."""

from __future__ import annotations

from scheduler_client.machine_spec import FailureMode, Gate, MachineSpec

ALLOCATION = MachineSpec(
    name="allocation",
    states=("planned", "pulling", "starting", "ready", "draining", "stopped", "failed"),
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
        FailureMode("secret missing", "failed", "a declared secret is not in the environment"),
        FailureMode("OOM", "failed", "the process exceeded its memory limit"),
        FailureMode(
            "session still active at drain deadline",
            "stopped",
            "a long-lived session was cut at the drain deadline",
        ),
        FailureMode("build digest mismatch", "failed", "the artifact's sha256 differs"),
    ),
)

HOST_DRAIN = MachineSpec(
    name="host_drain",
    states=(
        "cordoned",
        "evacuating",
        "replacement_ready",
        "upgrading",
        "postcheck",
        "uncordoned",
    ),
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
        Gate("quorum remains healthy", "evacuating", "enough ready capacity stays elsewhere"),
        Gate("runner headroom exists", "replacement_ready", "replacements fit somewhere"),
        Gate("active sessions can drain", "replacement_ready", "no session is pinned"),
        Gate("drift checks pass", "uncordoned", "the host matches its declared state"),
    ),
    failure_modes=(
        FailureMode("no headroom", "evacuating", "no capacity for the replacements"),
        FailureMode("active sessions pinned", "evacuating", "sessions that cannot move"),
        FailureMode("provider outage", "upgrading", "the provider failed the upgrade"),
        FailureMode("runner-agent regression", "postcheck", "the new runner failed checks"),
    ),
)

PROMOTION = MachineSpec(
    name="promotion",
    states=(
        "requested",
        "policy_check",
        "route_cas",
        "edge_propagating",
        "healthy",
        "rolled_back",
        "failed",
    ),
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
        FailureMode("route epoch conflict", "failed", "the predecessor epoch was not current"),
        FailureMode("edge replay gap", "rolled_back", "an edge did not ack in time"),
        FailureMode("DB rollback unsafe", "failed", "rollback would lose data"),
    ),
)

REGION = MachineSpec(
    name="region",
    states=(
        "requested",
        "provisioning",
        "binding_services",
        "replicating_artifacts",
        "eligible",
        "disabled",
    ),
    initial="requested",
    transitions=(
        ("requested", "provisioning"),
        ("provisioning", "binding_services"),
        ("binding_services", "replicating_artifacts"),
        ("replicating_artifacts", "eligible"),
        ("disabled", "eligible"),
    ),
    from_any=("disabled",),
    gates=(
        Gate("data topology ready", "binding_services", "databases placed"),
        Gate("runtime services available", "replicating_artifacts", "runners up"),
        Gate("secrets present", "eligible", "every app's secrets replicated"),
        Gate("residency allowed", "eligible", "the region may hold the data"),
    ),
    failure_modes=(
        FailureMode("artifact absent", "disabled", "an artifact is not replicated"),
        FailureMode("DB not replicated", "disabled", "a database is not replicated"),
        FailureMode("session store missing", "disabled", "no session store"),
        FailureMode("residency policy violation", "disabled", "data may not live here"),
    ),
)

MACHINES = {spec.name: spec for spec in (ALLOCATION, HOST_DRAIN, PROMOTION, REGION)}
