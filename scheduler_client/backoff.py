"""Exponential backoff with full jitter, sans-I/O: it computes delays, callers sleep.

Theory of operation. Retry number `attempt` (0 for the first retry) may wait up to
`ceiling(attempt) = min(cap, base * 2**attempt)`; the actual delay is drawn
uniformly from [0, ceiling] ("full jitter"), so many clients that failed together
spread their retries over the whole window instead of returning in lock-step.
The random source is injected so tests get exact, repeatable delays.
"""

from __future__ import annotations

import math
import random


class Backoff:
    """Full-jitter exponential backoff: delay = uniform(0, min(cap, base * 2**attempt))."""

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
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, not {attempt}")
        try:
            raw = math.ldexp(self.base, attempt)
        except OverflowError:
            # Past ~2**1024 the float overflows; the cap applies long before that anyway.
            raw = math.inf
        return min(self.cap, raw)

    def delay(self, attempt: int) -> float:
        """A delay drawn uniformly from [0, ceiling(attempt)]."""
        return self.rng.uniform(0.0, self.ceiling(attempt))

    def budget(self, retries: int) -> float:
        """The longest `retries` successive delays can add up to (the sum of their ceilings)."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        return math.fsum(self.ceiling(attempt) for attempt in range(retries))
