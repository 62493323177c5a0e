"""The Wake machine walked without an event loop."""

from __future__ import annotations

import itertools

import pytest

from scheduler_client.machine_spec import IllegalTransition
from wake.machine import WAKE


def test_states_are_exactly_the_gallerys() -> None:
    assert WAKE.states == (
        "cold",
        "wake_requested",
        "starting",
        "readiness_wait",
        "hot",
        "failed",
        "sleeping",
    )


@pytest.mark.parametrize("move", WAKE.all_moves(), ids=lambda m: f"{m[0]}->{m[1]}")
def test_every_allowed_move(move: tuple[str, str]) -> None:
    WAKE.check(*move)


def test_wake_cycle_and_retry_paths() -> None:
    cycle = ["cold", "wake_requested", "starting", "readiness_wait", "hot", "sleeping", "cold"]
    for current, target in itertools.pairwise(cycle):
        WAKE.check(current, target)
    for state in ("cold", "wake_requested", "starting", "readiness_wait", "hot", "sleeping"):
        WAKE.check(state, "failed")
    WAKE.check("failed", "wake_requested")
    WAKE.check("readiness_wait", "wake_requested")  # old route epoch


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("cold", "hot"),
        ("cold", "starting"),
        ("sleeping", "hot"),
        ("hot", "starting"),
        ("wake_requested", "hot"),
        ("failed", "hot"),
    ],
)
def test_illegal_moves_raise(current: str, target: str) -> None:
    with pytest.raises(IllegalTransition):
        WAKE.check(current, target)


def test_gates_and_failure_modes_are_the_gallerys() -> None:
    assert {g.name for g in WAKE.gates} == {
        "request class safe to hold",
        "wake budget available",
        "allocation passes readiness",
        "unsafe replay policy exists",
    }
    assert {f.name for f in WAKE.failure_modes} == {
        "payment webhook while cold",
        "wake stampede",
        "readiness timeout",
        "old route epoch",
    }
    assert WAKE.failure_mode("readiness timeout").leads_to == "failed"
    assert WAKE.gate("wake budget available").guards == "starting"
