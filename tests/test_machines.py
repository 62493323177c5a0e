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


def _into(target: str, *sources: str) -> set[tuple[str, str]]:
    return {(source, target) for source in sources}


# Every move the gallery allows, written out here rather than read from the tables under
# test: a move added to or missing from a table fails test_moves_are_exactly_the_gallerys.
GALLERY_MOVES = {
    "allocation": {
        ("planned", "pulling"),
        ("pulling", "starting"),
        ("starting", "ready"),
        ("ready", "draining"),
        ("planned", "draining"),
        ("pulling", "draining"),
        ("starting", "draining"),
        ("draining", "stopped"),
        # Any state but the terminal ones (stopped, failed) can fail.
        *_into("failed", "planned", "pulling", "starting", "ready", "draining"),
    },
    "host_drain": {
        ("uncordoned", "cordoned"),
        ("cordoned", "evacuating"),
        ("cordoned", "uncordoned"),
        ("evacuating", "replacement_ready"),
        ("evacuating", "uncordoned"),
        ("replacement_ready", "upgrading"),
        ("upgrading", "postcheck"),
        ("postcheck", "uncordoned"),
    },
    "promotion": {
        ("requested", "policy_check"),
        ("policy_check", "route_cas"),
        ("route_cas", "edge_propagating"),
        ("edge_propagating", "healthy"),
        ("edge_propagating", "rolled_back"),
        # Any state but the terminal ones (healthy, rolled_back, failed) can fail.
        *_into("failed", "requested", "policy_check", "route_cas", "edge_propagating"),
    },
    "region": {
        ("requested", "provisioning"),
        ("provisioning", "binding_services"),
        ("binding_services", "replicating_artifacts"),
        ("replicating_artifacts", "eligible"),
        ("disabled", "eligible"),
        # Any state can be disabled.
        *_into(
            "disabled",
            "requested",
            "provisioning",
            "binding_services",
            "replicating_artifacts",
            "eligible",
        ),
    },
}


@pytest.mark.parametrize("name", sorted(GALLERY_MOVES))
def test_moves_are_exactly_the_gallerys(name: str) -> None:
    spec = MACHINES[name]
    assert set(spec.all_moves()) == GALLERY_MOVES[name]
    for current, target in itertools.product(GALLERY_STATES[name], repeat=2):
        if (current, target) in GALLERY_MOVES[name]:
            spec.check(current, target)
        else:
            with pytest.raises(IllegalTransition):
                spec.check(current, target)


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
