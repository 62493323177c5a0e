"""The per-client wake allowance as plain data: a burst, a refill rate, bounded memory."""

from __future__ import annotations

import pytest

from edge.routing import client_wake_rate
from edge.routing.client_wake_rate import ClientWakeAllowance, ClientWakeRate, client_key


def test_a_burst_then_one_wake_per_refill() -> None:
    allowance = ClientWakeAllowance(ClientWakeRate(per_second=2.0, burst=3.0))
    assert [allowance.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert allowance.take("a", 0.0) == pytest.approx(0.5)  # next token in half a second
    assert allowance.take("a", 0.25) == pytest.approx(0.25)
    assert allowance.take("a", 0.5) == 0.0
    assert allowance.take("b", 0.5) == 0.0  # other clients have their own bucket


def test_refill_is_capped_at_the_burst() -> None:
    allowance = ClientWakeAllowance(ClientWakeRate(per_second=1.0, burst=2.0))
    allowance.take("a", 0.0)
    allowance.take("a", 0.0)
    assert [allowance.take("a", 100.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert allowance.take("a", 100.0) > 0


def test_zero_rate_turns_the_limit_off() -> None:
    allowance = ClientWakeAllowance(ClientWakeRate(per_second=0.0, burst=1.0))
    assert all(allowance.take("a", 0.0) == 0.0 for _ in range(100))
    assert len(allowance) == 0


def test_memory_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(client_wake_rate, "MAX_CLIENTS", 10)
    allowance = ClientWakeAllowance(ClientWakeRate(per_second=1.0, burst=5.0))
    for i in range(50):
        allowance.take(f"c{i}", float(i) * 0.01)
    assert len(allowance) <= 10
    # Refilled buckets are the first to go, and forgetting one is harmless: a full bucket.
    allowance.forget_full(1000.0)
    assert len(allowance) == 0


def test_the_client_is_the_peer_unless_a_trusted_proxy_forwarded_one() -> None:
    assert client_key("10.0.0.9", False, b"1.2.3.4") == "10.0.0.9"  # a claim, not trusted
    assert client_key("10.0.0.9", True, b"5.6.7.8, 1.2.3.4") == "1.2.3.4"
    assert client_key("10.0.0.9", True, b"") == "10.0.0.9"
