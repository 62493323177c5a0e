"""The one exponential back-off of the project, sans-I/O: it computes delays, callers sleep.

Theory of operation. Retry number `attempt` (0 for the first retry) waits
`min(cap, base * 2**attempt)`. With a random source the delay is instead drawn
uniformly from [0, that ceiling] ("full jitter"), so many clients that failed
together spread their retries over the whole window instead of returning in
lock-step. The control-plane client jitters; the wake back-off and durable
replay do not (their delays are stored or scheduled, not raced). The random
source is injected so tests get exact, repeatable delays.
"""

from __future__ import annotations

import math
import random


def delay(attempt: int, base: float, cap: float, jitter: random.Random | None = None) -> float:
    """`min(cap, base * 2**attempt)`; with `jitter`, a draw from [0, that] instead."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, not {attempt}")
    if not (base >= 0 and cap >= 0):  # also refuses NaN
        raise ValueError(f"backoff base and cap must be >= 0, not {base!r} and {cap!r}")
    try:
        raw = math.ldexp(base, attempt)  # base * 2**attempt, exact
    except OverflowError:
        # Past ~2**1024 the float overflows; the cap applies long before that anyway.
        raw = math.inf
    ceiling = min(cap, raw)
    return ceiling if jitter is None else jitter.uniform(0.0, ceiling)


class Backoff:
    """Full-jitter exponential back-off with fixed parameters (the control-plane client's)."""

    __slots__ = ("base", "cap", "rng")

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        if not (math.isfinite(base) and base >= 0):
            raise ValueError(f"backoff base must be a finite number >= 0, not {base!r}")
        if not (math.isfinite(cap) and cap >= 0):
            raise ValueError(f"backoff cap must be a finite number >= 0, not {cap!r}")
        self.base = float(base)
        self.cap = float(cap)
        self.rng = rng if rng is not None else random.Random()

    def ceiling(self, attempt: int) -> float:
        """The longest delay retry number `attempt` (0-based) may wait."""
        return delay(attempt, self.base, self.cap)

    def delay(self, attempt: int) -> float:
        """A delay drawn uniformly from [0, ceiling(attempt)]."""
        return delay(attempt, self.base, self.cap, self.rng)

    def budget(self, retries: int) -> float:
        """The longest `retries` successive delays can add up to (the sum of their ceilings)."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        return math.fsum(self.ceiling(attempt) for attempt in range(retries))
