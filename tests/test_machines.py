"""Every control-plane machine: exactly the designed moves are allowed, the rest raise. No I/O."""

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
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MOVES))
def test_the_table_allows_exactly_the_expected_moves(name: str) -> None:
    spec = MACHINES[name]
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
    MACHINES[name].check(*move)


@pytest.mark.parametrize("name", sorted(EXPECTED_MOVES))
def test_every_other_move_is_refused(name: str) -> None:
    spec = MACHINES[name]
    for move in itertools.product(GALLERY_STATES[name], repeat=2):
        if move not in EXPECTED_MOVES[name]:
            with pytest.raises(IllegalTransition):
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
