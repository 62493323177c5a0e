"""Every control-plane machine: each allowed move walks, illegal ones raise. No I/O."""

from __future__ import annotations

import itertools

import pytest

from scheduler_client.machine_spec import IllegalTransition, MachineSpec
from scheduler_client.machines import ALLOCATION, HOST_DRAIN, MACHINES, PROMOTION, REGION

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
}


@pytest.mark.parametrize("name", sorted(GALLERY_STATES))
def test_states_are_exactly_the_gallerys(name: str) -> None:
    assert MACHINES[name].states == GALLERY_STATES[name]


@pytest.mark.parametrize(
    ("spec", "move"),
    [(spec, move) for spec in MACHINES.values() for move in spec.all_moves()],
    ids=lambda v: v.name if isinstance(v, MachineSpec) else f"{v[0]}->{v[1]}",
)
def test_every_allowed_move_passes_check(spec: MachineSpec, move: tuple[str, str]) -> None:
    spec.check(*move)


@pytest.mark.parametrize("spec", list(MACHINES.values()), ids=lambda s: s.name)
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
    ):
        for current, target in itertools.pairwise(path):
            spec.check(current, target)


def test_gates_and_failure_modes_are_named_data() -> None:
    assert ALLOCATION.failure_mode("runner crash").leads_to == "failed"
    assert PROMOTION.gate("route epoch predecessor current").guards == "edge_propagating"
    with pytest.raises(KeyError):
        REGION.gate("no such gate")


def test_a_spec_naming_unknown_states_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown states"):
        MachineSpec(name="bad", states=("a",), initial="a", transitions=(("a", "b"),))
