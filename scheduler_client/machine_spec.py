"""State machines declared as data: states, allowed transitions, gates, failure modes.

Theory of operation. A `MachineSpec` is a frozen table, written once per machine
(see `machines.py`). Nothing here does I/O or keeps state: callers hold the
current state, ask `spec.check(current, target)` before persisting a move, and
persist before trusting its side effect. Gates are named checks whose outcome
the caller computes; failure modes are named reasons a machine can stop in a
given state. Both exist as data so pages, metrics and tests enumerate them, and
each has an `id` (snake_case of its name) that the code reports as a reason code
when a gate refuses a move or a failure mode happens (`reason_code` on resources,
journal rows and error bodies). `machine_move.py` carries out one move.
"""

from __future__ import annotations

import re

import msgspec

# A gate or failure mode only a real control plane detects: declared for the gallery,
# never reported by the local control plane in scheduler_client/local.
CONTROL_PLANE = "control plane"


class IllegalTransition(ValueError):
    """A move the machine's table does not allow."""

    def __init__(self, machine: str, current: str, target: str) -> None:
        self.machine = machine
        self.current = current
        self.target = target
        super().__init__(f"{machine}: illegal transition {current} -> {target}")


def identifier(name: str) -> str:
    """A gallery name as a stable snake_case id: "DB not replicated" -> "db_not_replicated"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Gate(msgspec.Struct, frozen=True):
    name: str
    guards: str  # the state a machine may enter only when this gate passes
    description: str
    id: str = ""  # identifier(name) unless given
    detected_by: str = ""  # "" when the code driving the machine checks it, else CONTROL_PLANE

    def __post_init__(self) -> None:
        if not self.id:
            msgspec.structs.force_setattr(self, "id", identifier(self.name))


class FailureMode(msgspec.Struct, frozen=True):
    name: str
    leads_to: str  # the state the machine ends in (or stays in) when it happens
    description: str
    id: str = ""  # identifier(name) unless given
    detected_by: str = ""  # "" when the code driving the machine reports it, else CONTROL_PLANE
    # The id of the gate whose refusal this is, when one is: reporting the failure
    # mode then also says which gate did not pass.
    gate: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            msgspec.structs.force_setattr(self, "id", identifier(self.name))


class MachineSpec(msgspec.Struct, frozen=True):
    name: str
    states: tuple[str, ...]
    initial: str
    transitions: tuple[tuple[str, str], ...]
    terminal: tuple[str, ...] = ()
    # Reachable from every non-terminal state (e.g. "failed").
    from_any: tuple[str, ...] = ()
    gates: tuple[Gate, ...] = ()
    failure_modes: tuple[FailureMode, ...] = ()
    title: str = ""  # the gallery's heading, e.g. "Allocation Lifecycle"

    def __post_init__(self) -> None:
        known = set(self.states)
        named = {self.initial, *self.terminal, *self.from_any}
        named.update(s for pair in self.transitions for s in pair)
        named.update(g.guards for g in self.gates)
        named.update(f.leads_to for f in self.failure_modes)
        unknown = named - known
        if unknown:
            raise ValueError(f"{self.name}: unknown states {sorted(unknown)}")
        ids = [g.id for g in self.gates] + [f.id for f in self.failure_modes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: gate and failure-mode ids must be unique: {ids}")
        gate_ids = {g.id for g in self.gates}
        bad_links = [f.id for f in self.failure_modes if f.gate and f.gate not in gate_ids]
        if bad_links:
            raise ValueError(f"{self.name}: failure modes name unknown gates: {bad_links}")

    def allowed(self, current: str) -> tuple[str, ...]:
        """States reachable from `current` in one move."""
        if current in self.terminal:
            return ()
        direct = [to for frm, to in self.transitions if frm == current]
        extra = [s for s in self.from_any if s != current and s not in direct]
        return (*direct, *extra)

    def can(self, current: str, target: str) -> bool:
        return target in self.allowed(current)

    def check(self, current: str, target: str) -> None:
        """Raise IllegalTransition unless `current -> target` is allowed."""
        if current not in self.states or not self.can(current, target):
            raise IllegalTransition(self.name, current, target)

    def all_moves(self) -> list[tuple[str, str]]:
        """Every allowed (from, to) pair, for tests and the gallery page."""
        return [(s, t) for s in self.states for t in self.allowed(s)]

    def gate(self, name: str) -> Gate:
        """The gate called `name`, by its gallery name or its id."""
        for gate in self.gates:
            if name in (gate.name, gate.id):
                return gate
        raise KeyError(f"{self.name}: no gate {name!r}")

    def failure_mode(self, name: str) -> FailureMode:
        """The failure mode called `name`, by its gallery name or its id."""
        for mode in self.failure_modes:
            if name in (mode.name, mode.id):
                return mode
        raise KeyError(f"{self.name}: no failure mode {name!r}")

    def refusal(self, gate_id: str) -> Gate | FailureMode:
        """What a refusal of the gate is reported as: the failure mode naming it, else the gate."""
        gate = self.gate(gate_id)
        for mode in self.failure_modes:
            if mode.gate == gate.id:
                return mode
        return gate

    def reason(self, reason_code: str) -> Gate | FailureMode:
        """The gate or failure mode a reason code names; KeyError for one not declared."""
        for item in (*self.gates, *self.failure_modes):
            if item.id == reason_code:
                return item
        raise KeyError(f"{self.name}: no gate or failure mode with id {reason_code!r}")
