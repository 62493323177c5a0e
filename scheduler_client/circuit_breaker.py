"""A circuit breaker, sans-I/O: callers ask before a call and report how it went.

Theory of operation. Three states:

- ``closed``: every call is allowed; `failure_threshold` consecutive failures open it.
- ``open``: calls are refused at once (the caller fails fast, touching nothing)
  until `cooldown` seconds have passed since it opened.
- ``half_open``: the first caller after the cool-down gets the single probe; every
  other caller is refused while the probe is in flight. The probe's success
  closes the breaker, its failure opens it again for another cool-down.

`allow()` hands out a `Ticket` stamped with the breaker's generation, which bumps
on every state change. An outcome reported on a ticket from an older generation
(a slow call that started before the breaker opened, say) is ignored, so it can
neither re-close an open breaker nor fail a probe it was not. A call that ends
without an outcome (cancelled, or a programming error) must `release()` its
ticket, or a lost probe would hold the breaker half-open forever.

What counts as a failure is the caller's decision; the clock is injected so tests
drive time without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]
CLOSED: BreakerState = "closed"
OPEN: BreakerState = "open"
HALF_OPEN: BreakerState = "half_open"


class Ticket:
    """Permission for one call; report its outcome (or release it) exactly once."""

    __slots__ = ("generation", "probe", "settled")

    def __init__(self, generation: int, probe: bool) -> None:
        self.generation = generation
        self.probe = probe
        self.settled = False

    def __repr__(self) -> str:
        kind = "probe" if self.probe else "call"
        return f"<Ticket {kind} gen={self.generation} settled={self.settled}>"


class CircuitBreaker:
    """Opens after N consecutive failures; one half-open probe after a cool-down."""

    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, not {failure_threshold}")
        if not cooldown >= 0:
            raise ValueError(f"cooldown must be >= 0, not {cooldown!r}")
        self.failure_threshold = failure_threshold
        self.cooldown = float(cooldown)
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = CLOSED
        self._generation = 0
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        # Counters for metrics and tests.
        self.opened_count = 0
        self.rejected_count = 0

    # ------------------------------------------------------------------ reading

    @property
    def state(self) -> BreakerState:
        """The current state; `open` stays `open` until a caller takes the probe."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until a probe may be tried (0 unless open)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    # ------------------------------------------------------------------ calling

    def allow(self) -> Ticket | None:
        """A ticket for one call, or None when the call must fail fast."""
        if self._state == CLOSED:
            return Ticket(self._generation, probe=False)
        if self._state == OPEN:
            if self._clock() - self._opened_at < self.cooldown:
                self.rejected_count += 1
                return None
            self._move(HALF_OPEN)
        # Half-open: a single probe at a time.
        if self._probe_in_flight:
            self.rejected_count += 1
            return None
        self._probe_in_flight = True
        return Ticket(self._generation, probe=True)

    def success(self, ticket: Ticket) -> None:
        """The call worked (the dependency answered sanely)."""
        if not self._settle(ticket):
            return
        if self._state == CLOSED:
            self._failures = 0
        elif self._state == HALF_OPEN and ticket.probe:
            self._probe_in_flight = False
            self._failures = 0
            self._move(CLOSED)

    def failure(self, ticket: Ticket) -> None:
        """The call failed in a way that says the dependency is unwell."""
        if not self._settle(ticket):
            return
        if self._state == CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()
        elif self._state == HALF_OPEN and ticket.probe:
            self._probe_in_flight = False
            self._open()

    def release(self, ticket: Ticket) -> None:
        """The call ended without an outcome; frees the probe slot if it held it."""
        if not self._settle(ticket):
            return
        if self._state == HALF_OPEN and ticket.probe:
            self._probe_in_flight = False

    # ------------------------------------------------------------------ internals

    def _settle(self, ticket: Ticket) -> bool:
        """Marks the ticket used; True when its outcome still concerns this generation."""
        if ticket.settled:
            return False
        ticket.settled = True
        return ticket.generation == self._generation

    def _open(self) -> None:
        self._opened_at = self._clock()
        self.opened_count += 1
        self._move(OPEN)

    def _move(self, target: BreakerState) -> None:
        previous, self._state = self._state, target
        self._generation += 1
        if self._on_change is not None:
            self._on_change(previous, target)

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self._state} failures={self._failures}/"
            f"{self.failure_threshold} cooldown={self.cooldown}s>"
        )
