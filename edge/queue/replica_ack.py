"""What a 202 waits for when `[store] min_replicas_acked` is set: decisions, no I/O.

Redis answers a write once its master has it; WAIT then says how many replicas have
every write its connection made. A master lost before its replica has an entry loses
the entry, so with min_replicas_acked the edge answers 202 only once that many
replicas confirmed it, and 503 otherwise (the entry may still be delivered; a resend
with the same dedupe key maps to it).
"""

from __future__ import annotations

import msgspec

# Redis answers a reply within this once WAIT's own timeout is over (one round trip).
REPLY_MARGIN = 0.1
# What a 503 for a missing replica ack tells the sender: a failover or a lagging replica
# settles within a few seconds (cluster-node-timeout and the election).
RETRY_AFTER = 2.0


class ReplicaAck(msgspec.Struct, frozen=True):
    """How many replicas must confirm an entry before its 202 (0: none), and how long
    WAIT may block for them (seconds)."""

    replicas: int = 0
    timeout: float = 0.5


def wait_timeout_ms(configured: float, left: float) -> int | None:
    """WAIT's timeout in ms: the configured one, cut to what the call's own deadline
    leaves after the reply's margin; None when too little is left to wait at all.
    Never 0, which would make WAIT block for ever."""
    budget = min(configured, left - REPLY_MARGIN)
    millis = int(budget * 1000)
    return millis if millis >= 1 else None


def replicated(acked: int, wanted: int) -> bool:
    """Whether WAIT's answer (replicas that have the entry) is enough for a 202."""
    return acked >= wanted


def not_replicated_reason(app: str, acked: int, wanted: int, timeout_ms: int | None) -> str:
    """What the 503 says (and the log): the count confirmed and what was asked."""
    waited = f"within {timeout_ms}ms" if timeout_ms else "(no time left to wait)"
    return (
        f"app {app}: the queued request reached {acked} of {wanted} replicas "
        f"{waited}; retry with the same dedupe key"
    )


__all__ = ["RETRY_AFTER", "ReplicaAck", "not_replicated_reason", "replicated", "wait_timeout_ms"]


def acks_unmet(wanted: int, fewest_replicas: int) -> str | None:
    """What `edge check` warns when a master has fewer live replicas than a 202 waits for
    (every queued request for its slots would be answered 503); None when enough."""
    if wanted <= 0 or fewest_replicas >= wanted:
        return None
    return (
        f"min_replicas_acked = {wanted} but a master has {fewest_replicas} connected "
        "replicas: every queued request for its keys will be answered 503 queue_unavailable"
    )
