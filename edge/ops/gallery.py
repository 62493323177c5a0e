"""The live gallery's data (GET /admin/gallery): every machine, its states, gates and
failure modes with their counts, the apps, the budget and the latest Wake transitions.

Theory of operation. `gallery_view` is a plain function over what the sources last
said (`GalleryInputs`) and `now`; `source_status` tracks whether a source answered.
Nothing here does I/O: `gallery_feed.py` gathers the inputs. The Wake machine is
counted from the wake store (apps' states, and the region-wide gallery counters of
`wake/gallery_counts.py`); the control plane's machines from its `GET /v1/machines`
report: states now, a gate refused = journal rows naming it (or the failure mode that
names its refusal), a gate passed = moves into the state it guards, a failure mode =
journal rows naming it. `None` (JSON null) always means "not reported": the source
never answered, or does not report that number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import msgspec

from scheduler_client.machine_spec import CONTROL_PLANE, FailureMode, Gate, MachineSpec
from scheduler_client.machines import ALLOCATION, CONTROL_PLANE_MACHINES, GALLERY
from scheduler_client.models import Allocation, MachineReport, MachinesReport
from wake import gallery_counts
from wake.budget import BudgetLimits, BudgetUsage
from wake.machine import WAKE
from wake.store.protocol import AppWakeState, Transition, WakePhases

MAX_TRANSITIONS = 100
SPECS: dict[str, MachineSpec] = {WAKE.name: WAKE, **CONTROL_PLANE_MACHINES}
EDGE = "edge"  # the owner of the Wake machine; the others' is CONTROL_PLANE
# By gallery name, not id: tests/test_gallery_in_use.py looks for the ids in the code
# that reports them, and this page only shows them.
_STAMPEDE = WAKE.failure_mode("wake stampede").id
_UNSAFE_WHILE_COLD = WAKE.failure_mode("payment webhook while cold").id


# ------------------------------------------------------------------ the JSON


class SourceStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # where it is (no credentials)
    ok: bool  # the last ask was answered
    stale_since: float | None = None  # unix time of the first failed ask since the last answer
    error: str = ""


class ControlPlaneStatus(SourceStatus, frozen=True, kw_only=True):
    configured: bool = True


class Sources(msgspec.Struct, frozen=True):
    store: SourceStatus
    control_plane: ControlPlaneStatus


class StateCount(msgspec.Struct, frozen=True):
    name: str
    count: int | None


class GateView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    description: str
    guards: str
    passed: int | None
    refused: int | None
    detected_by: str


class FailureModeView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    description: str
    leads_to: str
    count: int | None
    detail: str
    detected_by: str


class MachineView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    title: str
    owner: str  # "edge" | "control plane"
    reported: bool
    counts_scope: str  # "region", or "edge" when the wake store is this process's memory
    states: list[StateCount]  # declared order
    transitions: list[tuple[str, str]]  # allowed moves
    gates: list[GateView]
    failure_modes: list[FailureModeView]


class AllocationView(msgspec.Struct, frozen=True):
    id: str
    state: str
    address: str


class AppView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    tenant: str
    scale_to_zero: bool
    state: str | None
    reason: str
    held: int
    queued: int | None
    dead_letters: int | None
    hot_here: bool
    last_wake: WakePhases | None
    allocations: list[AllocationView] | None


class BudgetView(msgspec.Struct, frozen=True, kw_only=True):
    limit: int
    tenant_limit: int
    in_use: int | None
    waiting: int | None
    by_tenant: dict[str, int] | None


class TransitionView(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    machine: str
    app: str
    from_state: str
    to_state: str
    reason: str
    reason_code: str
    edge_id: str


class Gallery(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: float
    edge_id: str
    sources: Sources
    machines: list[MachineView]
    apps: list[AppView]
    budget: BudgetView | None
    transitions: list[TransitionView]  # newest first


# ------------------------------------------------------------------ the inputs


class AppInput(msgspec.Struct, frozen=True, kw_only=True):
    """One configured app as this edge knows it without asking anyone."""

    name: str
    tenant: str = "default"
    scale_to_zero: bool = False
    queue: bool = False  # it has a durable queue
    held: int = 0  # held now, all workers
    hot_here: bool = False  # this worker believes it hot


class StoreData(msgspec.Struct, frozen=True, kw_only=True):
    """What the wake store last answered, per part; None: it never has."""

    counts: dict[str, int] | None = None
    states: dict[str, AppWakeState] | None = None
    transitions: list[Transition] | None = None  # oldest first, as the store returns them
    budget: BudgetUsage | None = None
    depths: dict[str, tuple[int, int]] = {}  # app -> (queued, dead letters), apps answered


class ControlPlaneData(msgspec.Struct, frozen=True, kw_only=True):
    """What the control plane last answered; None: it never has (or is not configured)."""

    report: MachinesReport | None = None
    allocations: list[Allocation] | None = None


class GalleryInputs(msgspec.Struct, frozen=True, kw_only=True):
    edge_id: str
    apps: list[AppInput]
    budget_limits: BudgetLimits | None  # None when no app scales to zero
    counts_scope: str
    store: StoreData
    control_plane: ControlPlaneData
    sources: Sources


# ------------------------------------------------------------------ functions

S = TypeVar("S", bound=SourceStatus)


def source_status(previous: S, *, ok: bool, error: str, now: float) -> S:
    """The status after an ask: `stale_since` set at the first failure, kept while failing,
    cleared by an answer."""
    if ok:
        return msgspec.structs.replace(previous, ok=True, stale_since=None, error="")
    since = previous.stale_since if previous.stale_since is not None else now
    return msgspec.structs.replace(previous, ok=False, stale_since=since, error=error)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def wake_failure_detail(mode_id: str, counts: dict[str, int]) -> str:
    """The line under a Wake failure mode's count, from the region-wide counters."""
    if mode_id == _STAMPEDE:
        requests = counts.get(gallery_counts.failure(mode_id), 0)
        wakes = counts.get(gallery_counts.WAKES, 0)
        return f"{requests:,} requests coalesced into {_plural(wakes, 'wake')}"
    if mode_id == _UNSAFE_WHILE_COLD:
        queued = counts.get(gallery_counts.failure(mode_id, "queued"), 0)
        rejected = counts.get(gallery_counts.failure(mode_id, "rejected"), 0)
        return f"{queued:,} queued, {rejected:,} rejected"
    return ""


def wake_machine(inputs: GalleryInputs) -> MachineView:
    """Wake: states of the configured scale-to-zero apps, gates and failures from counters."""
    store = inputs.store
    counts = store.counts
    in_state: Counter[str] | None = None
    if store.states is not None:
        names = [a.name for a in inputs.apps if a.scale_to_zero]
        in_state = Counter(store.states[n].state for n in names if n in store.states)

    def gate_counts(g: Gate) -> tuple[int | None, int | None]:
        if counts is None:
            return None, None
        passed = counts.get(gallery_counts.gate_passed(g.id), 0)
        return passed, counts.get(gallery_counts.gate_refused(g.id), 0)

    def mode_count(f: FailureMode) -> tuple[int | None, str]:
        if counts is None:
            return None, ""
        return counts.get(gallery_counts.failure(f.id), 0), wake_failure_detail(f.id, counts)

    return _machine(
        WAKE,
        EDGE,
        reported=in_state is not None or counts is not None,
        scope=inputs.counts_scope,
        states=None if in_state is None else dict(in_state),
        gate_counts=gate_counts,
        mode_count=mode_count,
    )


def _moves_into(report: MachineReport, state: str) -> int:
    return sum(n for key, n in report.moves.items() if key.partition("->")[2] == state)


def control_plane_machine(spec: MachineSpec, report: MachineReport | None) -> MachineView:
    """A control-plane machine from its report; unreported: every count null."""
    reasons = report.reasons if report is not None else {}

    def gate_counts(g: Gate) -> tuple[int | None, int | None]:
        if report is None:
            return None, None
        linked = [f.id for f in spec.failure_modes if f.gate == g.id]
        refused = sum(reasons.get(code, 0) for code in (g.id, *linked))
        return _moves_into(report, g.guards), refused

    def mode_count(f: FailureMode) -> tuple[int | None, str]:
        return (None if report is None else reasons.get(f.id, 0)), ""

    return _machine(
        spec,
        CONTROL_PLANE,
        reported=report is not None,
        scope="region",
        states=None if report is None else report.states,
        gate_counts=gate_counts,
        mode_count=mode_count,
    )


def _machine(
    spec: MachineSpec,
    owner: str,
    *,
    reported: bool,
    scope: str,
    states: dict[str, int] | None,
    gate_counts: Callable[[Gate], tuple[int | None, int | None]],
    mode_count: Callable[[FailureMode], tuple[int | None, str]],
) -> MachineView:
    """The view of one machine; `gate_counts` gives (passed, refused), `mode_count`
    (count, detail), None where the source did not report them."""
    gates = []
    for g in spec.gates:
        passed, refused = gate_counts(g)
        gates.append(
            GateView(
                id=g.id,
                name=g.name,
                description=g.description,
                guards=g.guards,
                passed=passed,
                refused=refused,
                detected_by=g.detected_by,
            )
        )
    modes = []
    for f in spec.failure_modes:
        count, detail = mode_count(f)
        modes.append(
            FailureModeView(
                id=f.id,
                name=f.name,
                description=f.description,
                leads_to=f.leads_to,
                count=count,
                detail=detail,
                detected_by=f.detected_by,
            )
        )
    return MachineView(
        name=spec.name,
        title=spec.title or spec.name,
        owner=owner,
        reported=reported,
        counts_scope=scope,
        states=[StateCount(s, None if states is None else states.get(s, 0)) for s in spec.states],
        transitions=spec.all_moves(),
        gates=gates,
        failure_modes=modes,
    )


def app_view(app: AppInput, store: StoreData, allocations: list[Allocation] | None) -> AppView:
    """One app: its Wake state (always-on apps are hot), holds, queue and live allocations."""
    state: str | None = "hot"
    reason = ""
    last_wake = None
    hot_here = True
    if app.scale_to_zero:
        known = store.states.get(app.name) if store.states is not None else None
        state = known.state if known is not None else None
        reason = known.reason if known is not None else ""
        last_wake = known.last_wake if known is not None else None
        hot_here = app.hot_here
    queued: int | None = 0
    dead: int | None = 0
    if app.queue:
        depth = store.depths.get(app.name)
        queued, dead = depth if depth is not None else (None, None)
    live = None
    if allocations is not None:
        live = [
            AllocationView(a.id, a.state, a.address)
            for a in allocations
            if a.app == app.name and a.state not in ALLOCATION.terminal
        ]
    return AppView(
        name=app.name,
        tenant=app.tenant,
        scale_to_zero=app.scale_to_zero,
        state=state,
        reason=reason,
        held=app.held,
        queued=queued,
        dead_letters=dead,
        hot_here=hot_here,
        last_wake=last_wake,
        allocations=live,
    )


def budget_view(limits: BudgetLimits | None, usage: BudgetUsage | None) -> BudgetView | None:
    if limits is None:
        return None
    return BudgetView(
        limit=limits.max_concurrent_wakes,
        tenant_limit=limits.tenant_max_concurrent_wakes,
        in_use=usage.in_use if usage is not None else None,
        waiting=usage.waiting if usage is not None else None,
        by_tenant=dict(usage.by_tenant) if usage is not None else None,
    )


def transitions_view(transitions: list[Transition] | None) -> list[TransitionView]:
    """The Wake journal, newest first, at most MAX_TRANSITIONS (the store gives oldest first)."""
    return [
        TransitionView(
            at=t.at,
            machine=WAKE.name,
            app=t.app,
            from_state=t.from_state,
            to_state=t.to_state,
            reason=t.reason,
            reason_code=t.reason_code,
            edge_id=t.edge_id,
        )
        for t in reversed((transitions or [])[-MAX_TRANSITIONS:])
    ]


def gallery_view(inputs: GalleryInputs, now: float) -> Gallery:
    """The whole gallery document, machines in the gallery's order."""
    report = inputs.control_plane.report
    reported = {m.name: m for m in report.machines} if report is not None else {}
    machines = [
        wake_machine(inputs)
        if name == WAKE.name
        else control_plane_machine(SPECS[name], reported.get(name))
        for name in GALLERY
    ]
    return Gallery(
        generated_at=now,
        edge_id=inputs.edge_id,
        sources=inputs.sources,
        machines=machines,
        apps=[app_view(a, inputs.store, inputs.control_plane.allocations) for a in inputs.apps],
        budget=budget_view(inputs.budget_limits, inputs.store.budget),
        transitions=transitions_view(inputs.store.transitions),
    )
