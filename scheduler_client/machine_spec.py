"""State machines declared as data: states, allowed transitions, gates, failure modes.

Theory of operation. A `MachineSpec` is a frozen table, written once per machine
(see `machines.py`). Nothing here does I/O or keeps state: callers hold the
current state, ask `spec.check(current, target)` before persisting a move, and
persist before trusting its side effect. Gates are named checks whose outcome
the caller computes; failure modes are named reasons a machine can stop in a
given state. Both exist as data so pages, metrics and tests enumerate them.
"""

from __future__ import annotations

import msgspec


class IllegalTransition(ValueError):
    """A move the machine's table does not allow."""

    def __init__(self, machine: str, current: str, target: str) -> None:
        self.machine = machine
        self.current = current
        self.target = target
        super().__init__(f"{machine}: illegal transition {current} -> {target}")


class Gate(msgspec.Struct, frozen=True):
    name: str
    guards: str  # the state a machine may enter only when this gate passes
    description: str


class FailureMode(msgspec.Struct, frozen=True):
    name: str
    leads_to: str  # the state the machine ends in (or stays in) when it happens
    description: str


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

    def __post_init__(self) -> None:
        known = set(self.states)
        named = {self.initial, *self.terminal, *self.from_any}
        named.update(s for pair in self.transitions for s in pair)
        named.update(g.guards for g in self.gates)
        named.update(f.leads_to for f in self.failure_modes)
        unknown = named - known
        if unknown:
            raise ValueError(f"{self.name}: unknown states {sorted(unknown)}")

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
        for gate in self.gates:
            if gate.name == name:
                return gate
        raise KeyError(f"{self.name}: no gate {name!r}")

    def failure_mode(self, name: str) -> FailureMode:
        for mode in self.failure_modes:
            if mode.name == name:
                return mode
        raise KeyError(f"{self.name}: no failure mode {name!r}")
