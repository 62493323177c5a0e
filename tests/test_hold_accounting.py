"""Hold accounting as plain data: reservations per app and per worker, given back once."""

from __future__ import annotations

from edge.routing.hold_accounting import HoldAccounting, HoldCaps


def test_reserve_and_release_balance_per_app_and_in_all() -> None:
    holds = HoldAccounting(HoldCaps(10, 10_000))
    holds.reserve("a", 100)
    holds.reserve("a", 50)
    holds.reserve("b", 7)
    assert (holds.total, holds.bytes) == (3, 157)
    assert (holds.held("a"), holds.bytes_by_app["a"]) == (2, 150)
    holds.release("a", 100)
    holds.release("b", 7)
    assert (holds.total, holds.bytes, holds.held("a"), holds.held("b")) == (1, 50, 1, 0)
    holds.release("a", 50)
    assert (holds.total, holds.bytes) == (0, 0)
    assert holds.by_app == {} and holds.bytes_by_app == {}  # nothing left per app


def test_fits_checks_every_cap() -> None:
    holds = HoldAccounting(HoldCaps(max_held=2, max_held_body_bytes=100))
    app_caps = HoldCaps(max_held=5, max_held_body_bytes=60)
    assert holds.fits("a", app_caps, 60)
    assert not holds.fits("a", app_caps, 61)  # the app's bytes
    holds.reserve("a", 60)
    assert not holds.fits("a", app_caps, 1)
    assert holds.fits("b", app_caps, 40)
    assert not holds.fits("b", app_caps, 41)  # the worker's bytes
    holds.reserve("b", 0)
    assert not holds.fits("c", app_caps, 0)  # the worker's count
    assert not holds.fits("a", HoldCaps(max_held=1, max_held_body_bytes=1000), 0)  # the app's count


def test_new_caps_apply_to_what_is_held_already() -> None:
    holds = HoldAccounting(HoldCaps(10, 1000))
    holds.reserve("a", 10)
    holds.caps = HoldCaps(1, 1000)  # a reload lowers the worker's cap
    assert not holds.fits("b", HoldCaps(10, 1000), 0)
    holds.release("a", 10)
    assert holds.fits("b", HoldCaps(10, 1000), 0)


def test_grow_counts_arriving_bytes_within_every_cap() -> None:
    holds = HoldAccounting(HoldCaps(max_held=10, max_held_body_bytes=100))
    app_caps = HoldCaps(max_held=10, max_held_body_bytes=60)
    holds.reserve("a", 0)
    assert holds.grow("a", app_caps, 60)
    assert not holds.grow("a", app_caps, 1)  # the app's bytes
    holds.reserve("b", 0)
    assert holds.grow("b", app_caps, 40)
    assert not holds.grow("b", app_caps, 1)  # the worker's bytes
    assert (holds.bytes, holds.bytes_by_app) == (100, {"a": 60, "b": 40})
    holds.release("a", 60)
    holds.release("b", 40)
    assert (holds.total, holds.bytes, holds.bytes_by_app) == (0, 0, {})
