"""One way a machine moves: check the table, build the new record and its journal entry.

Theory of operation. Every machine record (an allocation, a promotion, a host,
a region, an app's wake state) is a msgspec Struct with `state`, `reason` and
`updated_at`, and optionally `version` and `reason_code`. `plan_move` checks a
move against the machine's `MachineSpec` and returns a `Move`: the record as it
must be persisted and the journal entry that records the move. It does no I/O
and reads no clock, so a sync caller (the local control plane, SQLite) and an
async one (the wake controller, Redis with a fencing token) carry out the same
plan the same way:

    move = plan_move(SPEC, record, "ready", subject=record.id, now=now)
    persist(move.record, move.entry)   # one transaction: the move is durable first
    notify()                           # then watchers may act on it

    # async, fenced: the same plan, awaited writes
    move = plan_move(WAKE, state, "hot", subject=app, now=clock())
    if not await store.write_state(move.record, lease.token): raise LeaseLost
    await store.append_transition(<move.entry with edge_id and token>)
    await store.publish(app)

`plan_event` records something that happened without a move (a gate that did
not pass, a late report) the same way, and `plan_create` the creation of a
record in its machine's initial state.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from scheduler_client.machine_spec import MachineSpec

R = TypeVar("R", bound=msgspec.Struct)


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One journal row: a move, or an event when from_state == to_state."""

    machine: str
    subject: str
    from_state: str  # "" for the row that records the subject's creation
    to_state: str
    reason: str = ""
    # The gate or failure-mode id (MachineSpec.reason) behind the row, if any.
    reason_code: str = ""
    at: float


class Move(msgspec.Struct, Generic[R], frozen=True):
    """The record to persist and the journal entry to persist with it, in one write."""

    record: R
    entry: JournalEntry


def _stamped(
    spec: MachineSpec,
    record: R,
    now: float,
    reason: str,
    reason_code: str,
    changes: dict[str, Any],
    *,
    record_reason: bool = True,
) -> R:
    if reason_code:
        spec.reason(reason_code)  # a reported code is always one the machine declares
    fields = record.__struct_fields__
    stamp: dict[str, Any] = {"updated_at": now}
    if record_reason:
        stamp["reason"] = reason
        if "reason_code" in fields:
            stamp["reason_code"] = reason_code
    if "version" in fields:
        stamp["version"] = record.version + 1  # type: ignore[attr-defined]
    return msgspec.structs.replace(record, **{**stamp, **changes})


def plan_move(
    spec: MachineSpec,
    record: R,
    target: str,
    *,
    subject: str,
    now: float,
    reason: str = "",
    reason_code: str = "",
    **changes: Any,
) -> Move[R]:
    """Check `record.state -> target` (IllegalTransition if refused) and plan it.

    The new record carries `target`, `reason`, `reason_code`, `updated_at=now`, a
    bumped `version` (for records that have these fields) and `changes`.
    """
    current: str = record.state  # type: ignore[attr-defined]
    spec.check(current, target)
    new = _stamped(spec, record, now, reason, reason_code, {"state": target, **changes})
    entry = JournalEntry(
        machine=spec.name,
        subject=subject,
        from_state=current,
        to_state=target,
        reason=reason,
        reason_code=reason_code,
        at=now,
    )
    return Move(new, entry)


def plan_event(
    spec: MachineSpec,
    record: R,
    *,
    subject: str,
    now: float,
    reason: str,
    reason_code: str = "",
    record_reason: bool = True,
    **changes: Any,
) -> Move[R]:
    """Plan a journalled event that leaves the state as it is (e.g. a gate that did not pass).

    `record_reason=False` journals the reason but leaves the record's own (say, why a
    finished promotion ended); `updated_at`, `version` and `changes` apply either way.
    """
    current: str = record.state  # type: ignore[attr-defined]
    if current not in spec.states:
        raise ValueError(f"{spec.name}: unknown state {current!r}")
    new = _stamped(spec, record, now, reason, reason_code, changes, record_reason=record_reason)
    entry = JournalEntry(
        machine=spec.name,
        subject=subject,
        from_state=current,
        to_state=current,
        reason=reason,
        reason_code=reason_code,
        at=now,
    )
    return Move(new, entry)


def plan_create(
    spec: MachineSpec, record: R, *, subject: str, now: float, reason: str = ""
) -> Move[R]:
    """Plan the first write of a record, which must be in the machine's initial state."""
    state: str = record.state  # type: ignore[attr-defined]
    if state != spec.initial:
        raise ValueError(f"{spec.name}: a new {subject} must start {spec.initial}, not {state}")
    entry = JournalEntry(
        machine=spec.name, subject=subject, from_state="", to_state=state, reason=reason, at=now
    )
    return Move(record, entry)
