"""The Wake gallery's counting rules and the per-process deltas, as plain data (no loop).

Which event adds to which region-wide counter (wake/gallery_tally.py's docstring), the
batches a process sends and resends, and the phases a wake stores for Server-Timing.
"""

from __future__ import annotations

import re

import pytest

from edge.http.forward_headers import server_timing
from edge.server.config import REPLAY_POLICY_GATE, ConfigError, load_config_text, refused_gate
from scheduler_client.models import Allocation
from wake import decisions, gallery_tally
from wake.gallery_counts import WAKES, failure, gate_passed, gate_refused
from wake.gallery_tally import Admitted, Batch, GalleryTally
from wake.machine import WAKE
from wake.store.protocol import WakePhases

GALLERY_IDS = {g.id for g in WAKE.gates} | {f.id for f in WAKE.failure_modes}


def test_every_counted_id_is_one_of_the_wake_gallerys() -> None:
    counted = {
        gallery_tally.SAFE_TO_HOLD,
        gallery_tally.BUDGET,
        gallery_tally.READINESS,
        gallery_tally.REPLAY_POLICY,
        gallery_tally.PAYMENT_WEBHOOK,
        gallery_tally.STAMPEDE,
        gallery_tally.READINESS_TIMEOUT,
        gallery_tally.OLD_ROUTE_EPOCH,
    }
    assert counted == GALLERY_IDS
    assert REPLAY_POLICY_GATE == gallery_tally.REPLAY_POLICY


# ------------------------------------------------------------------ admission


def test_a_held_request_passes_the_safe_to_hold_gate() -> None:
    assert gallery_tally.admission_keys(Admitted.HELD) == (
        "gate_passed:request_class_safe_to_hold",
    )


@pytest.mark.parametrize("admitted", [Admitted.QUEUED, Admitted.REJECTED])
def test_an_unsafe_request_is_the_gates_refusal_and_a_payment_webhook_while_cold(
    admitted: Admitted,
) -> None:
    assert gallery_tally.admission_keys(admitted) == (
        "gate_refused:request_class_safe_to_hold",
        "failure:payment_webhook_while_cold",
        f"failure:payment_webhook_while_cold:{admitted.value}",
    )


# ---------------------------------------------------------------- transitions


@pytest.mark.parametrize("before", ["cold", "failed"])
def test_a_new_wake_is_counted_when_the_holder_moves_to_wake_requested(before: str) -> None:
    assert gallery_tally.starts_wake(before, "wake_requested")
    assert gallery_tally.transition_keys(before, "wake_requested", "") == (WAKES,)


@pytest.mark.parametrize("before", ["starting", "readiness_wait", "wake_requested"])
def test_a_retried_or_taken_over_wake_is_not_a_new_one(before: str) -> None:
    assert not gallery_tally.starts_wake(before, "wake_requested")
    assert gallery_tally.transition_keys(before, "wake_requested", "") == ()


def test_each_old_route_epoch_is_counted_and_is_no_new_wake() -> None:
    move = decisions.old_epoch_move(_alloc())
    assert gallery_tally.transition_keys("readiness_wait", move.target, move.reason_code) == (
        "failure:old_route_epoch",
    )


def test_readiness_gate_passes_on_hot_and_is_refused_by_a_readiness_timeout() -> None:
    assert gallery_tally.transition_keys("readiness_wait", "hot") == (
        "gate_passed:allocation_passes_readiness",
    )
    code = decisions.GALLERY[decisions.RefuseKind.READINESS_TIMEOUT]
    for before in ("starting", "readiness_wait"):
        assert gallery_tally.transition_keys(before, "failed", code) == (
            "gate_refused:allocation_passes_readiness",
            "failure:readiness_timeout",
        )


def test_other_failures_and_moves_count_nothing() -> None:
    budget = decisions.GALLERY[decisions.RefuseKind.BUDGET]
    epoch = decisions.GALLERY[decisions.RefuseKind.OLD_ROUTE_EPOCH]
    assert gallery_tally.transition_keys("wake_requested", "failed", budget) == ()
    # The epoch kept moving: each occurrence was counted with its move back already.
    assert gallery_tally.transition_keys("readiness_wait", "failed", epoch) == ()
    assert gallery_tally.transition_keys("starting", "failed", "") == ()
    assert gallery_tally.transition_keys("hot", "sleeping", "") == ()
    assert gallery_tally.transition_keys("wake_requested", "starting", "") == ()


# --------------------------------------------------------------------- budget


def test_budget_gate_passes_per_grant_and_is_refused_once_per_attempt() -> None:
    answers = [False, False, False, True]  # told to wait three times, then granted
    keys: list[str] = []
    refused = False
    for granted in answers:
        keys += gallery_tally.budget_keys(granted, refused)
        refused = refused or not granted
    assert keys == ["gate_refused:wake_budget_available", "gate_passed:wake_budget_available"]
    assert gallery_tally.budget_keys(True, False) == ("gate_passed:wake_budget_available",)


def test_stampede_and_gates_checked_outside_a_wake() -> None:
    assert gallery_tally.coalesced_keys() == ("failure:wake_stampede",)
    assert gallery_tally.gate_keys(REPLAY_POLICY_GATE, True) == (
        "gate_passed:unsafe_replay_policy_exists",
    )
    assert gallery_tally.gate_keys(REPLAY_POLICY_GATE, False) == (
        "gate_refused:unsafe_replay_policy_exists",
    )


# ---------------------------------------------------------------------- tally


def test_deltas_accumulate_and_go_out_as_one_batch() -> None:
    tally = GalleryTally("edge-a:1:ff")
    assert not tally.has_work() and tally.next_batch() is None
    for _ in range(3):
        tally.add(gallery_tally.admission_keys(Admitted.HELD))
    tally.add(gallery_tally.coalesced_keys())
    tally.add(gallery_tally.coalesced_keys())
    batch = tally.next_batch()
    assert batch == Batch(
        1, {gate_passed("request_class_safe_to_hold"): 3, failure("wake_stampede"): 2}
    )
    assert tally.pending == {}
    tally.sent(1)
    assert not tally.has_work()


def test_a_failed_batch_is_resent_as_is_and_newer_deltas_wait_for_the_next() -> None:
    tally = GalleryTally("edge-a:1:ff")
    tally.add([WAKES])
    first = tally.next_batch()
    tally.failed()
    tally.add([WAKES, failure("wake_stampede")])  # counted while the store was down
    assert tally.next_batch() == first  # same seq: the store adds it at most once
    assert tally.failures == 1
    assert tally.total() == {WAKES: 2, failure("wake_stampede"): 1}
    tally.sent(first.seq)  # type: ignore[union-attr]
    assert tally.failures == 0
    second = tally.next_batch()
    assert second == Batch(2, {WAKES: 1, failure("wake_stampede"): 1})
    tally.sent(1)  # a late answer for an older batch does not drop the one in flight
    assert tally.in_flight == second


def test_the_pending_map_is_capped() -> None:
    tally = GalleryTally("w", max_keys=2)
    tally.add([gate_passed("a"), gate_refused("a")])
    tally.add([gate_passed("a"), gate_passed("b")], n=3)
    assert tally.pending == {gate_passed("a"): 4, gate_refused("a"): 1}
    assert tally.dropped == 3


def test_flushes_every_half_second_backing_off_to_five_while_failing() -> None:
    pauses = [gallery_tally.flush_pause(f) for f in range(6)]
    assert pauses == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


# --------------------------------------------------------------------- phases


def test_wake_phases_are_milliseconds_never_negative_and_total_covers_them() -> None:
    phases = decisions.wake_phases(
        1_700_000_000.0, budget=0.0123, allocation=0.5, readiness=1.25, total=1.8
    )
    assert phases == WakePhases(
        at=1_700_000_000.0,
        budget_ms=12.3,
        allocation_ms=500.0,
        readiness_ms=1250.0,
        total_ms=1800.0,
    )
    odd = decisions.wake_phases(5.0, budget=-0.001, allocation=0.2, readiness=0.3, total=0.1)
    assert odd.budget_ms == 0.0 and odd.total_ms == 500.0


TIMING = re.compile(r"^(\w+);dur=(\d+\.\d)$")


def parse_server_timing(value: str) -> dict[str, float]:
    """name -> dur of a Server-Timing value (RFC: comma-separated metrics, params after ;)."""
    out = {}
    for metric in value.split(", "):
        found = TIMING.match(metric)
        assert found, f"not a Server-Timing metric: {metric!r}"
        out[found[1]] = float(found[2])
    return out


def test_server_timing_of_a_held_request_with_and_without_the_wakes_phases() -> None:
    phases = WakePhases(at=1.0, budget_ms=0.4, allocation_ms=20.25, readiness_ms=1003.0)
    field = server_timing(1234.56, phases)
    assert field.endswith(b"\r\n") and field.startswith(b"Server-Timing: ")
    value = field[len(b"Server-Timing: ") : -2].decode()
    assert parse_server_timing(value) == {
        "wake": 1234.6,
        "budget": 0.4,
        "allocation": 20.2,
        "readiness": 1003.0,
    }
    assert server_timing(7.0, None) == b"Server-Timing: wake;dur=7.0\r\n"


# --------------------------------------------------------------------- config


def test_a_config_refused_by_the_replay_policy_gate_says_so() -> None:
    queue_without_policy = """
[edge]
store = "redis://127.0.0.1:6379/0"
[control_plane]
url = "http://127.0.0.1:9"
[[apps]]
name = "shop"
hosts = ["shop.localhost"]
scale_to_zero = true
rules = [{class = "queue", methods = ["POST"], path_prefix = "/hooks/"}]
"""
    with pytest.raises(ConfigError) as refused:
        load_config_text(queue_without_policy)
    assert refused_gate(refused.value) == "unsafe_replay_policy_exists"
    with pytest.raises(ConfigError) as other:
        load_config_text("[edge]\nlisten = 'nowhere'\n")
    assert refused_gate(other.value) == ""


def _alloc() -> Allocation:
    return Allocation(id="a-1", app="shop", state="ready", route_epoch=3)
