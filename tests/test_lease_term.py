"""LeaseTerm, the replayer's own bound on acting under its lease (no loop, no store): what
a grant, a renewal asked before a freeze, and a refused renewal leave it."""

from __future__ import annotations

from edge.queue.replay_policy import LeaseTerm


def test_a_lease_term_ends_before_the_store_would_let_the_lease_lapse() -> None:
    term = LeaseTerm(10.0, asked_at=100.0)
    assert term.valid(107.9) and not term.valid(108.0)  # 20 % margin before the store's 110
    term.renewed(105.0)
    assert term.valid(112.9) and not term.valid(113.0)
    term.renewed(101.0)  # a late answer to an older renewal never shortens the term
    assert term.valid(112.9)
    frozen = LeaseTerm(10.0, asked_at=0.0)
    assert not frozen.valid(12.0)  # thawed after a 12 s SIGSTOP: the lease is not ours


def test_a_renewal_asked_before_a_freeze_counts_from_its_ask_not_its_answer() -> None:
    """Asked at 3, frozen until 15, answered then: the store granted it at 3 at the latest,
    so the term runs to 3 + 8, over at the thaw; the answer extends nothing past that."""
    term = LeaseTerm(10.0, asked_at=0.0)
    term.renewed(3.0)
    assert not term.valid(15.0)
    assert term.valid(10.9) and not term.valid(11.0)


def test_a_renewal_after_the_thaw_that_the_store_grants_starts_a_valid_term() -> None:
    """Nobody took the lease while we were frozen: the store renewed it, from the ask."""
    term = LeaseTerm(10.0, asked_at=0.0)
    assert not term.valid(15.0)
    term.renewed(15.0)
    assert term.valid(15.1) and term.valid(22.9) and not term.valid(23.0)


def test_a_refused_renewal_ends_the_term_for_good() -> None:
    term = LeaseTerm(10.0, asked_at=100.0)
    term.end()  # the store said the lease is another holder's
    assert not term.valid(100.0)
    term.renewed(101.0)  # an answer that comes late (or a bug calling it) revives nothing
    assert not term.valid(101.0)
