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


# Every move the gallery allows, written out here rather than read from the table under
# test: a move added to or missing from WAKE fails test_moves_are_exactly_the_gallerys.
GALLERY_MOVES = {
    ("cold", "wake_requested"),
    ("wake_requested", "starting"),
    ("starting", "readiness_wait"),
    ("readiness_wait", "hot"),
    ("hot", "sleeping"),
    ("sleeping", "cold"),
    ("starting", "wake_requested"),  # old route epoch: retried
    ("readiness_wait", "wake_requested"),  # old route epoch: retried
    ("hot", "cold"),  # the allocation went away under a hot app
    ("failed", "wake_requested"),
    ("failed", "cold"),
    # Any state can fail.
    *{
        (state, "failed")
        for state in ("cold", "wake_requested", "starting", "readiness_wait", "hot", "sleeping")
    },
}


def test_moves_are_exactly_the_gallerys() -> None:
    assert set(WAKE.all_moves()) == GALLERY_MOVES
    for current, target in itertools.product(WAKE.states, repeat=2):
        if (current, target) in GALLERY_MOVES:
            WAKE.check(current, target)
        else:
            with pytest.raises(IllegalTransition):
                WAKE.check(current, target)


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
