"""The Wake machine's region-wide gallery counters: what counts as what, and the deltas one
process keeps until they reach the store. Plain data and functions: no I/O, no clock.

Theory of operation. The wake controller (and, through it, the front) turns what
happened into counter keys with the functions below, adds them to its `GalleryTally`,
and every ~0.5 s while anything is pending sends them to the store in one call
(`WakeStore.add_counts`). A store that is down keeps them pending: they are sent
when it answers. One batch is in flight at a time, tagged with the process's writer
id and a sequence number, so a batch whose answer was lost (a timeout after Redis
applied it) is sent again without being counted twice.

What each counter counts (keys from wake/gallery_counts.py; all region-wide, summed
over every worker of every edge sharing the store):

- `gate_passed:request_class_safe_to_hold`: a request for an app that was not hot,
  held while the app wakes.
- `gate_refused:request_class_safe_to_hold`: a request answered at once because its
  class is not safe to hold. That refusal is the failure mode
  `failure:payment_webhook_while_cold`, counted with it, and with its outcome
  `failure:payment_webhook_while_cold:queued` (accepted by the durable queue, 202) or
  `...:rejected` (503: not safe to hold, or a queue that refused it). Counted when
  the answer is given: a queued request whose body never arrived whole is not.
- `gate_passed:wake_budget_available`: a wake attempt got its budget slot (then
  wake_requested -> starting); `gate_refused:...`: an attempt told to wait or
  refused by the budget, once per attempt however often it asked again.
- `gate_passed:allocation_passes_readiness`: readiness_wait -> hot;
  `gate_refused:...`: the wake failed because its allocation was not started or
  ready in time, which is also `failure:readiness_timeout`.
- `gate_passed` / `gate_refused:unsafe_replay_policy_exists`: a config load that
  passed the check / a config refused for it. Each edge's worker 0 counts its own
  loads (at start and at each reload it reads, `/admin/reload` included), one per
  load; a reload the supervisor refuses never reaches a worker and is not counted.
- `failure:wake_stampede`: requests (held, queued or rejected alike: each asks for
  the wake) that joined a wake already in progress instead of starting one: a request
  that found this process's wake flight running, and the request that started a
  flight which then found another process holding the lease (or the app made hot by
  another process's wake). `wakes`: wakes started, whoever asked (the lease holder
  moved the app cold or failed -> wake_requested; a wake taken over or retried under
  a new route epoch is not a new one). So the page can say "`failure:wake_stampede`
  requests coalesced into `wakes` wakes".
- `failure:old_route_epoch`: each allocation abandoned because a promotion replaced
  its route epoch (the wake retried).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import msgspec

from wake.gallery_counts import WAKES, failure, gate_passed, gate_refused

# Gallery ids (wake/machine.py) of the gates and failure modes counted here.
SAFE_TO_HOLD = "request_class_safe_to_hold"
BUDGET = "wake_budget_available"
READINESS = "allocation_passes_readiness"
REPLAY_POLICY = "unsafe_replay_policy_exists"
PAYMENT_WEBHOOK = "payment_webhook_while_cold"
STAMPEDE = "wake_stampede"
READINESS_TIMEOUT = "readiness_timeout"
OLD_ROUTE_EPOCH = "old_route_epoch"

# Pending keys kept at most (the keys are a small fixed set; this only bounds a surprise).
MAX_PENDING_KEYS = 256
# Flushes: every half second while something is pending; doubling to 5 s while the store fails.
FLUSH_EVERY = 0.5
FLUSH_EVERY_FAILING_MAX = 5.0


class Admitted(enum.StrEnum):
    """What the front did with a request for an app that was not hot."""

    HELD = "held"  # held in memory while the app wakes
    QUEUED = "queued"  # not safe to hold: accepted by the durable queue
    REJECTED = "rejected"  # not safe to hold: answered 503 at once


def admission_keys(admitted: Admitted) -> tuple[str, ...]:
    """Gate "request class safe to hold": passed when held; else payment webhook while cold."""
    if admitted is Admitted.HELD:
        return (gate_passed(SAFE_TO_HOLD),)
    return (
        gate_refused(SAFE_TO_HOLD),
        failure(PAYMENT_WEBHOOK),
        failure(PAYMENT_WEBHOOK, admitted.value),
    )


def starts_wake(from_state: str, to_state: str) -> bool:
    """A new wake, not the retry of one: cold or failed -> wake_requested."""
    return to_state == "wake_requested" and from_state in ("cold", "failed")


def transition_keys(from_state: str, to_state: str, reason_code: str = "") -> tuple[str, ...]:
    """The counters one written Wake transition adds to."""
    if starts_wake(from_state, to_state):
        return (WAKES,)
    if from_state == "readiness_wait" and to_state == "hot":
        return (gate_passed(READINESS),)
    if to_state == "failed" and reason_code == READINESS_TIMEOUT:
        return (gate_refused(READINESS), failure(READINESS_TIMEOUT))
    if to_state == "wake_requested" and reason_code == OLD_ROUTE_EPOCH:
        return (failure(OLD_ROUTE_EPOCH),)
    return ()


def budget_keys(granted: bool, refused_before: bool) -> tuple[str, ...]:
    """Gate "wake budget available" for one answer of the budget to an attempt: passed on
    the grant, refused on the first wait or refusal of the attempt only."""
    if granted:
        return (gate_passed(BUDGET),)
    return () if refused_before else (gate_refused(BUDGET),)


def coalesced_keys() -> tuple[str, ...]:
    """Failure mode "wake stampede": one request joined a wake already in progress."""
    return (failure(STAMPEDE),)


def gate_keys(gate_id: str, passed: bool) -> tuple[str, ...]:
    """A gate checked outside a wake (e.g. "unsafe replay policy exists" at config load)."""
    return (gate_passed(gate_id) if passed else gate_refused(gate_id),)


def flush_pause(failures: int) -> float:
    """Seconds before the next flush: FLUSH_EVERY, doubling per consecutive failure to 5 s."""
    return min(FLUSH_EVERY * 2 ** max(0, failures), FLUSH_EVERY_FAILING_MAX)


class Batch(msgspec.Struct, frozen=True):
    """Deltas sent to the store in one call; `seq` makes a resend count once."""

    seq: int
    deltas: dict[str, int]


class GalleryTally:
    """One process's counter deltas not yet in the store, and the batch on its way there."""

    def __init__(self, writer: str, max_keys: int = MAX_PENDING_KEYS) -> None:
        self.writer = writer  # unique per process (a restart is a new writer)
        self.max_keys = max_keys
        self.pending: dict[str, int] = {}
        self.in_flight: Batch | None = None
        self.failures = 0  # consecutive failed sends
        self.dropped = 0  # counts lost to the key cap
        self._seq = 0

    def add(self, keys: Iterable[str], n: int = 1) -> None:
        pending = self.pending
        for key in keys:
            if key in pending:
                pending[key] += n
            elif len(pending) < self.max_keys:
                pending[key] = n
            else:
                self.dropped += n

    def has_work(self) -> bool:
        return self.in_flight is not None or bool(self.pending)

    def next_batch(self) -> Batch | None:
        """What to send: the batch the store has not confirmed, else the pending deltas."""
        if self.in_flight is None and self.pending:
            self._seq += 1
            self.in_flight = Batch(self._seq, self.pending)
            self.pending = {}
        return self.in_flight

    def sent(self, seq: int) -> None:
        """The store confirmed batch `seq`."""
        if self.in_flight is not None and self.in_flight.seq == seq:
            self.in_flight = None
        self.failures = 0

    def failed(self) -> None:
        """The send failed or timed out: the same batch (same seq) goes again next time."""
        self.failures += 1

    def total(self) -> dict[str, int]:
        """Everything not yet confirmed by the store, by key."""
        out = dict(self.in_flight.deltas) if self.in_flight is not None else {}
        for key, n in self.pending.items():
            out[key] = out.get(key, 0) + n
        return out
