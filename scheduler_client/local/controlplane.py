"""The local control plane: allocation lifecycle, routes, promotions, host drain, region.

Theory of operation. Every move of every machine is planned by `machine_move`
(checked against its table in `machines.py`), persisted with its journal row in
one SQLite transaction (`store.py`), announced to watchers, and only then acted
on (spawn, signal, route change). A gate that does not pass or a failure mode
that happens is reported by its id in `reason_code`. One asyncio task drives
each allocation, drain, promotion and host drain; a monitor loop watches every
running process for exits and memory. After a restart, live processes are
adopted and vanished ones are failed, so the file is the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from scheduler_client.local.app_process import AppProcess, missing_secrets, verify_artifact
from scheduler_client.local.config import AppSpec, ControlPlaneConfig
from scheduler_client.local.loopback import free_port
from scheduler_client.local.store import ControlPlaneStore
from scheduler_client.machine_move import Move, plan_create, plan_event, plan_move
from scheduler_client.machine_spec import MachineSpec
from scheduler_client.machines import ALLOCATION, HOST_DRAIN, PROMOTION, REGION
from scheduler_client.models import (
    Allocation,
    AppRoute,
    BadRequest,
    Conflict,
    CreateAllocation,
    CreatePromotion,
    EdgeInfo,
    GateStatus,
    Gone,
    Host,
    MachineReport,
    MachinesReport,
    NotFound,
    Promotion,
    Region,
    RouteChanges,
    RouteSnapshot,
    RouteTarget,
    Unavailable,
)
from scheduler_client.task_stop import stop_tasks

MONITOR_INTERVAL = 0.2
APPROVAL_TIMEOUT = 3600.0
PROMOTION_DRAIN_DEADLINE = 10.0
EVACUATION_SLACK = 10.0

Record = TypeVar("Record", Allocation, Promotion, Host, Region)
# Where each machine this control plane drives keeps its instances.
_TABLES = {
    ALLOCATION.name: "allocations",
    PROMOTION.name: "promotions",
    HOST_DRAIN.name: "hosts",
    REGION.name: "regions",
}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(5).hex()}"


def _host_gate(gate_id: str, passed: bool, detail: str = "") -> GateStatus:
    gate = HOST_DRAIN.gate(gate_id)
    return GateStatus(name=gate.name, id=gate.id, passed=passed, detail=detail)


def _machine(record: Allocation | Promotion | Host | Region) -> tuple[MachineSpec, str]:
    """The machine a record belongs to, and its subject in the journal."""
    if isinstance(record, Allocation):
        return ALLOCATION, record.id
    if isinstance(record, Promotion):
        return PROMOTION, record.id
    if isinstance(record, Host):
        return HOST_DRAIN, record.name
    return REGION, record.name


class Broadcast:
    """Wakes every waiter on each change; waits are always bounded by the caller."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout))


class ControlPlane:
    def __init__(
        self,
        config: ControlPlaneConfig,
        store: ControlPlaneStore,
        environ: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.config = config
        self.section = config.controlplane
        self.store = store
        # Where declared secrets (and PATH, LANG) come from; an app sees nothing else of it.
        self.environ = dict(os.environ if environ is None else environ)
        self.cwd = cwd or os.getcwd()
        self.log_dir = Path(self.section.state_file).parent / "app-logs"
        # Each app's own HOME: not the operator's, where the platform's files are.
        self.home_dir = Path(self.section.state_file).parent / "app-homes"
        self.processes: dict[str, AppProcess] = {}
        self.changed = Broadcast()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # ---------------------------------------------------------------- running

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._init_region()
        self._init_host()
        self._recover()
        self._spawn(self._monitor())

    async def close(self) -> None:
        """Stop driving; app processes keep running and are adopted on the next start."""
        self._closing = True  # the monitor stops on it, whatever becomes of its cancellation
        await stop_tasks(list(self._tasks), what="control plane close", errors=logging.DEBUG)

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _app(self, name: str) -> AppSpec:
        spec = self.config.app(name)
        if spec is None:
            raise NotFound(f"unknown app {name!r}")
        return spec

    # ----------------------------------------------------------- machine moves

    def _commit(self, move: Move[Record]) -> Record:
        """Persist the record with its journal row (one transaction), then tell watchers."""
        self.store.save(move.record, move.entry)
        self.changed.notify()
        return move.record

    def _move(
        self,
        record: Record,
        target: str,
        reason: str = "",
        reason_code: str = "",
        **changes: object,
    ) -> Record:
        """Check, persist and announce one transition of any machine."""
        spec, subject = _machine(record)
        return self._commit(
            plan_move(
                spec,
                record,
                target,
                subject=subject,
                now=time.time(),
                reason=reason,
                reason_code=reason_code,
                **changes,
            )
        )

    def _note(
        self,
        record: Record,
        reason: str,
        reason_code: str = "",
        record_reason: bool = True,
        **changes: object,
    ) -> Record:
        """Persist and announce a journalled event that leaves the record's state as it is."""
        spec, subject = _machine(record)
        return self._commit(
            plan_event(
                spec,
                record,
                subject=subject,
                now=time.time(),
                reason=reason,
                reason_code=reason_code,
                record_reason=record_reason,
                **changes,
            )
        )

    def _create(self, record: Record, reason: str = "") -> Record:
        spec, subject = _machine(record)
        return self._commit(
            plan_create(spec, record, subject=subject, now=time.time(), reason=reason)
        )

    # ------------------------------------------------------------ allocations

    def _update(self, alloc: Allocation, **changes: object) -> Allocation:
        new = msgspec.structs.replace(
            alloc, version=alloc.version + 1, updated_at=time.time(), **changes
        )
        self.store.save(new)
        self.changed.notify()
        return new

    def get_allocation(self, allocation_id: str) -> Allocation:
        alloc = self.store.allocation(allocation_id)
        if alloc is None:
            raise NotFound(f"no allocation {allocation_id!r}")
        return alloc

    def _admission_problem(self) -> Unavailable | None:
        region = self.get_region()
        if region.state != "eligible":
            why = f": {region.reason}" if region.reason else ""
            return Unavailable(
                f"region {region.name} is {region.state}{why}; no new allocations",
                region.reason_code,
            )
        host = self.get_host(self.section.host)
        if host.state != "uncordoned":
            return Unavailable(f"host {host.name} is {host.state}: no new allocations")
        live = len(self.store.live_allocations())
        if live >= self.section.max_allocations:
            return Unavailable(
                f"no headroom: {live} of {self.section.max_allocations} allocations running",
                "no_headroom",
            )
        return None

    def create_allocation(self, request: CreateAllocation) -> tuple[Allocation, bool]:
        """(allocation, created); the same idempotency key returns the first allocation."""
        self._app(request.app)
        if request.idempotency_key:
            existing = self.store.allocation_by_key(request.app, request.idempotency_key)
            if existing is not None:
                return existing, False
        problem = self._admission_problem()
        if problem:
            raise problem
        route = self.store.route(request.app)
        now = time.time()
        alloc = Allocation(
            id=_new_id("a"),
            app=request.app,
            state=ALLOCATION.initial,
            host=self.section.host,
            route_epoch=route[0].epoch if route else 0,
            version=1,
            created_at=now,
            updated_at=now,
            idempotency_key=request.idempotency_key,
        )
        move = plan_create(ALLOCATION, alloc, subject=alloc.id, now=now, reason="created")
        self.store.insert_allocation(move.record, move.entry)
        self.changed.notify()
        self._spawn(self._run_allocation(alloc.id))
        return alloc, True

    async def _run_allocation(self, allocation_id: str) -> None:
        alloc = self.get_allocation(allocation_id)
        spec = self._app(alloc.app)
        if alloc.state == "planned":
            alloc = self._move(alloc, "pulling")
        if alloc.state != "pulling":
            return
        ok, actual = await verify_artifact(spec)
        alloc = self.get_allocation(allocation_id)
        if alloc.state != "pulling":
            return
        if not ok:
            got = actual or "an unreadable artifact"
            self._fail(
                alloc,
                f"build digest mismatch: expected {spec.digest}, got {got}",
                "build_digest_mismatch",
            )
            return
        missing = missing_secrets(spec, self.environ)
        if missing:
            self._fail(alloc, f"secret missing: {', '.join(missing)}", "secret_missing")
            return
        port = free_port()
        # Persisted before the spawn: a restart then knows a process may exist.
        alloc = self._move(alloc, "starting", address=f"127.0.0.1:{port}", artifact_digest=actual)
        try:
            proc = AppProcess.spawn(
                spec,
                port=port,
                allocation_id=alloc.id,
                cwd=self.cwd,
                environ=self.environ,
                home=self.home_dir / spec.name,
                log_path=str(self.log_dir / f"{alloc.id}.log"),
            )
        except OSError as exc:
            self._fail(alloc, f"runner crash: cannot start the command: {exc}", "runner_crash")
            return
        self.processes[alloc.id] = proc
        alloc = self._update(alloc, pid=proc.pid, pid_start_ticks=proc.start_ticks)
        await self._await_ready(alloc.id, proc, spec)

    async def _await_ready(self, allocation_id: str, proc: AppProcess, spec: AppSpec) -> None:
        problem = await proc.wait_ready(spec.readiness_path, spec.start_timeout)
        alloc = self.get_allocation(allocation_id)
        if alloc.state != "starting":
            return  # drained or failed meanwhile; that path owns the process
        if problem is not None:
            if problem.startswith("exited"):
                self._fail(alloc, f"runner crash: {problem}", "runner_crash")
            else:
                self._fail(alloc, f"readiness timeout: {problem}", "health_readiness_pass")
            return
        current = self.store.route(alloc.app)
        promoted = current[1] if current is not None else 0
        routed = alloc.route_epoch >= promoted
        alloc = self._move(alloc, "ready", routed=routed)
        if routed:
            self._change_route(alloc.app, lambda targets: [*targets, self._target(alloc)])
        else:
            # Granted before a promotion replaced the route: never routed to.
            self._note(
                alloc,
                f"old route epoch: granted under {alloc.route_epoch}, route replaced at "
                f"{promoted}; not routed",
                "old_route_epoch",
            )

    def _fail(self, alloc: Allocation, reason: str, reason_code: str) -> Allocation:
        proc = self.processes.pop(alloc.id, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        alloc = self._move(alloc, "failed", reason, reason_code)
        self._route_remove(alloc)
        return alloc

    def drain_allocation(self, allocation_id: str, deadline_s: float) -> Allocation:
        alloc = self.get_allocation(allocation_id)
        if alloc.state in ALLOCATION.terminal or alloc.state == "draining":
            return alloc
        if deadline_s < 0 or deadline_s > 86400:
            raise BadRequest("deadline_s must be between 0 and 86400")
        alloc = self._move(alloc, "draining", drain_deadline=time.time() + deadline_s)
        self._route_set_state(alloc, "draining", alloc.drain_deadline)
        self._spawn(self._finish_drain(alloc.id))
        return alloc

    async def _finish_drain(self, allocation_id: str) -> None:
        alloc = self.get_allocation(allocation_id)
        spec = self._app(alloc.app)
        proc = self.processes.get(allocation_id)
        deadline = alloc.drain_deadline or time.time()
        while time.time() < deadline and (proc is None or proc.poll() is None):
            await asyncio.sleep(min(MONITOR_INTERVAL, max(0.0, deadline - time.time())))
        active = 0
        if proc is not None and proc.poll() is None:
            active = await proc.active_sessions()
            await proc.terminate(spec.drain_grace)
        self.processes.pop(allocation_id, None)
        alloc = self.get_allocation(allocation_id)
        if alloc.state != "draining":
            return
        reason, reason_code = "drained", ""
        if active:
            reason = f"session still active at drain deadline: {active} cut"
            reason_code = "session_still_active_at_drain_deadline"
        alloc = self._move(
            alloc, "stopped", reason, reason_code, active_sessions_at_deadline=active
        )
        self._route_remove(alloc)

    async def watch_allocation(
        self, allocation_id: str, version: int, timeout: float
    ) -> Allocation:
        deadline = time.monotonic() + min(timeout, self.section.long_poll_max)
        alloc = self.get_allocation(allocation_id)
        while alloc.version <= version and time.monotonic() < deadline:
            await self.changed.wait(deadline - time.monotonic())
            alloc = self.get_allocation(allocation_id)
        return alloc

    async def _monitor(self) -> None:
        """Exits and memory of running processes, checked every MONITOR_INTERVAL."""
        while not self._closing:
            await asyncio.sleep(MONITOR_INTERVAL)
            for allocation_id, proc in list(self.processes.items()):
                alloc = self.store.allocation(allocation_id)
                if alloc is None or alloc.state not in ("starting", "ready"):
                    continue
                spec = self.config.app(alloc.app)
                code = proc.poll()
                if code is not None:
                    self._fail(alloc, f"runner crash: exited with code {code}", "runner_crash")
                    continue
                rss = proc.rss_bytes()
                if spec is not None and rss is not None and rss > spec.memory_limit:
                    self._fail(
                        alloc,
                        f"OOM: resident memory {rss} bytes over limit {spec.memory_limit}",
                        "oom",
                    )

    def _recover(self) -> None:
        """Adopt live processes, fail vanished ones, resume unfinished stages."""
        for alloc in self.store.live_allocations():
            spec = self.config.app(alloc.app)
            if spec is None:
                self._fail(alloc, "runner crash: app no longer configured", "runner_crash")
                continue
            if alloc.state in ("planned", "pulling"):
                self._spawn(self._run_allocation(alloc.id))
                continue
            port = int(alloc.address.rpartition(":")[2]) if alloc.address else 0
            proc = (
                AppProcess.adopt(alloc.pid, port, start_ticks=alloc.pid_start_ticks)
                if alloc.pid
                else None
            )
            if proc is None:
                if alloc.state == "draining":
                    self._spawn(self._finish_drain(alloc.id))
                else:
                    self._fail(
                        alloc,
                        "runner crash: process gone across a control-plane restart",
                        "runner_crash",
                    )
                continue
            self.processes[alloc.id] = proc
            if alloc.state == "starting":
                self._spawn(self._await_ready(alloc.id, proc, spec))
            elif alloc.state == "draining":
                self._spawn(self._finish_drain(alloc.id))
        for promotion in self.store.promotions():
            if promotion.state == "edge_propagating":
                self._spawn(self._propagate(promotion.id))
            elif promotion.state not in PROMOTION.terminal:
                self._move(promotion, "failed", "interrupted by a control-plane restart")

    # ------------------------------------------------------------------ routes

    def _target(self, alloc: Allocation, state: str | None = None) -> RouteTarget:
        host = self.store.host(alloc.host)
        return RouteTarget(
            allocation_id=alloc.id,
            address=alloc.address,
            state=state or alloc.state,
            host=alloc.host,
            host_state=host.state if host else "uncordoned",
        )

    def _change_route(
        self, app: str, edit: Callable[[list[RouteTarget]], list[RouteTarget] | None]
    ) -> None:
        current = self.store.route(app)
        targets = list(current[0].targets) if current else []
        new = edit(targets)
        if new is None:
            return
        self.store.commit_route(
            AppRoute(app=app, epoch=0, targets=new), cas=False, history=self.section.route_history
        )
        self.changed.notify()

    def _route_set_state(
        self, alloc: Allocation, state: str, drain_deadline: float | None = None
    ) -> None:
        def edit(targets: list[RouteTarget]) -> list[RouteTarget] | None:
            if not any(t.allocation_id == alloc.id for t in targets):
                return None
            return [
                msgspec.structs.replace(t, state=state, drain_deadline=drain_deadline)
                if t.allocation_id == alloc.id
                else t
                for t in targets
            ]

        self._change_route(alloc.app, edit)

    def _route_remove(self, alloc: Allocation) -> None:
        def edit(targets: list[RouteTarget]) -> list[RouteTarget] | None:
            kept = [t for t in targets if t.allocation_id != alloc.id]
            return kept if len(kept) != len(targets) else None

        self._change_route(alloc.app, edit)

    def route_snapshot(self) -> RouteSnapshot:
        return RouteSnapshot(
            epoch=self.store.route_epoch(), apps=self.store.routes(), region=self.get_region()
        )

    async def route_changes(
        self, after: int, timeout: float, edge_id: str | None = None
    ) -> RouteChanges:
        if edge_id:
            self._touch_edge(edge_id)
        deadline = time.monotonic() + min(timeout, self.section.long_poll_max)
        while True:
            current = self.store.route_epoch()
            if after > current:
                raise Gone(f"epoch {after} is ahead of the control plane ({current}): resync")
            oldest = self.store.oldest_retained_epoch()
            if after < current and (oldest is None or after + 1 < oldest):
                raise Gone(
                    f"epoch {after} is older than the retained history (oldest {oldest}): "
                    "resync from the snapshot",
                    "edge_replay_gap",
                )
            if after < current or time.monotonic() >= deadline:
                return RouteChanges(epoch=current, changes=self.store.route_changes_after(after))
            await self.changed.wait(deadline - time.monotonic())

    def route_cas(self, app: str, expected_epoch: int, allocation_ids: list[str]) -> AppRoute:
        self._app(app)
        current = self.store.route(app)
        current_epoch = current[0].epoch if current else 0
        if expected_epoch != current_epoch:
            raise Conflict(
                f"route epoch conflict: expected {expected_epoch}, current {current_epoch}",
                "route_epoch_conflict",
            )
        targets = []
        for allocation_id in allocation_ids:
            alloc = self.get_allocation(allocation_id)
            if alloc.app != app:
                raise BadRequest(f"allocation {allocation_id} belongs to app {alloc.app!r}")
            if alloc.state != "ready":
                raise BadRequest(
                    f"allocation {allocation_id} is {alloc.state}, not ready",
                    "runtime_services_ready",
                )
            targets.append(self._target(alloc))
        change = self.store.commit_route(
            AppRoute(app=app, epoch=0, targets=targets),
            cas=True,
            history=self.section.route_history,
        )
        self.changed.notify()
        return change.route

    # ------------------------------------------------------------------- edges

    def _touch_edge(self, edge_id: str) -> EdgeInfo:
        edge = self.store.edge(edge_id)
        if edge is None:
            raise NotFound(f"edge {edge_id!r} is not registered")
        edge = msgspec.structs.replace(edge, last_seen=time.time(), live=True)
        self.store.save_edge(edge)
        return edge

    def register_edge(self, edge_id: str) -> EdgeInfo:
        if not edge_id or len(edge_id) > 200:
            raise BadRequest("edge_id must be 1-200 characters")
        edge = self.store.edge(edge_id) or EdgeInfo(edge_id=edge_id)
        edge = msgspec.structs.replace(edge, last_seen=time.time(), live=True)
        self.store.save_edge(edge)
        self.changed.notify()
        return edge

    def ack_epoch(self, edge_id: str, epoch: int) -> EdgeInfo:
        edge = self._touch_edge(edge_id)
        current = self.store.route_epoch()
        if epoch > current:
            # Acking an epoch that does not exist yet would count for future promotions.
            raise BadRequest(f"epoch {epoch} is ahead of the control plane ({current})")
        previous = edge.acked_epoch
        if epoch > edge.acked_epoch:
            edge = msgspec.structs.replace(edge, acked_epoch=epoch)
            self.store.save_edge(edge)
        for promotion in self.store.promotions():
            # Late once: the ack that first reaches the promotion's epoch, not every
            # later ack (or retry) from the same edge.
            late = (
                promotion.state in PROMOTION.terminal
                and edge_id in promotion.waiting_for
                and edge_id not in promotion.acked_by
                and previous < promotion.to_epoch <= epoch
            )
            if late:
                # The promotion keeps the reason it ended with; the journal keeps the report.
                self._note(
                    promotion,
                    f"late worker report: edge {edge_id} acked epoch {epoch} after the end",
                    "late_worker_report",
                    record_reason=False,
                    late_reports=promotion.late_reports + 1,
                )
        self.changed.notify()
        return edge

    def edges(self) -> list[EdgeInfo]:
        now = time.time()
        limit = self.section.edge_live_timeout
        return [
            msgspec.structs.replace(e, live=now - e.last_seen < limit) for e in self.store.edges()
        ]

    # -------------------------------------------------------------- promotions

    def get_promotion(self, promotion_id: str) -> Promotion:
        promotion = self.store.promotion(promotion_id)
        if promotion is None:
            raise NotFound(f"no promotion {promotion_id!r}")
        return promotion

    def create_promotion(self, request: CreatePromotion) -> Promotion:
        spec = self._app(request.app)
        alloc = self.get_allocation(request.allocation_id)
        if alloc.app != request.app:
            raise BadRequest(f"allocation {alloc.id} belongs to app {alloc.app!r}")
        if not 0 < request.propagation_timeout_s <= 3600:
            raise BadRequest("propagation_timeout_s must be in (0, 3600]")
        now = time.time()
        promotion = Promotion(
            id=_new_id("p"),
            app=request.app,
            allocation_id=alloc.id,
            state=PROMOTION.initial,
            approval_required=spec.approval_required,
            created_at=now,
            updated_at=now,
        )
        promotion = self._create(promotion)
        self._spawn(
            self._run_promotion(promotion.id, request.expected_epoch, request.propagation_timeout_s)
        )
        return promotion

    def approve_promotion(self, promotion_id: str) -> Promotion:
        promotion = self.get_promotion(promotion_id)
        if not promotion.approved:
            promotion = msgspec.structs.replace(promotion, approved=True, updated_at=time.time())
            self.store.save(promotion)
            self.changed.notify()
        return promotion

    async def _run_promotion(
        self, promotion_id: str, expected_epoch: int | None, timeout: float
    ) -> None:
        promotion = self._move(self.get_promotion(promotion_id), "policy_check")
        if promotion.approval_required:
            deadline = time.monotonic() + APPROVAL_TIMEOUT
            while not self.get_promotion(promotion_id).approved:
                if time.monotonic() >= deadline:
                    self._move(
                        promotion,
                        "failed",
                        "approval not given in time",
                        "approval_present_if_required",
                    )
                    return
                await self.changed.wait(deadline - time.monotonic())
            promotion = self.get_promotion(promotion_id)
        alloc = self.get_allocation(promotion.allocation_id)
        if alloc.state != "ready":
            self._move(
                promotion,
                "failed",
                f"runtime services ready: allocation is {alloc.state}",
                "runtime_services_ready",
            )
            return
        spec = self._app(promotion.app)
        ok, actual = await verify_artifact(spec)
        if not ok or (alloc.artifact_digest and alloc.artifact_digest != actual):
            self._move(
                promotion,
                "failed",
                f"preview artifact mismatch: allocation runs {alloc.artifact_digest}, "
                f"artifact is {actual}",
                "preview_artifact_exactly_matches",
            )
            return
        promotion = self._move(promotion, "route_cas")
        current = self.store.route(promotion.app)
        current_epoch = current[0].epoch if current else 0
        expected = current_epoch if expected_epoch is None else expected_epoch
        previous = [t.allocation_id for t in current[0].targets] if current else []
        try:
            route = self.route_cas(promotion.app, expected, [alloc.id])
        except (Conflict, BadRequest) as exc:
            self._move(promotion, "failed", exc.message, exc.reason_code)
            return
        waiting = [e.edge_id for e in self.edges() if e.live]
        self._move(
            promotion,
            "edge_propagating",
            from_epoch=current_epoch,
            to_epoch=route.epoch,
            previous_allocations=previous,
            waiting_for=waiting,
            deadline=time.time() + timeout,
        )
        await self._propagate(promotion_id)

    async def _propagate(self, promotion_id: str) -> None:
        promotion = self.get_promotion(promotion_id)
        while True:
            acked = [
                edge_id
                for edge_id in promotion.waiting_for
                if (edge := self.store.edge(edge_id)) and edge.acked_epoch >= promotion.to_epoch
            ]
            if acked != promotion.acked_by:
                promotion = msgspec.structs.replace(promotion, acked_by=acked)
                self.store.save(promotion)
            if len(acked) == len(promotion.waiting_for):
                self._move(promotion, "healthy", "every live edge acked")
                for allocation_id in promotion.previous_allocations:
                    if allocation_id != promotion.allocation_id:
                        with contextlib.suppress(NotFound):
                            self.drain_allocation(allocation_id, PROMOTION_DRAIN_DEADLINE)
                return
            remaining = (promotion.deadline or 0) - time.time()
            if remaining <= 0:
                self._roll_back(promotion, acked)
                return
            await self.changed.wait(remaining)

    def _roll_back(self, promotion: Promotion, acked: list[str]) -> None:
        missing = [e for e in promotion.waiting_for if e not in acked]
        targets = []
        for allocation_id in promotion.previous_allocations:
            alloc = self.store.allocation(allocation_id)
            if alloc is not None and alloc.state == "ready":
                targets.append(self._target(alloc))
        change = self.store.commit_route(
            AppRoute(app=promotion.app, epoch=0, targets=targets),
            cas=True,
            history=self.section.route_history,
        )
        self._move(
            promotion,
            "rolled_back",
            f"edge replay gap: {', '.join(missing)} did not ack epoch "
            f"{promotion.to_epoch} in time; previous route restored at epoch {change.epoch}",
            "edge_replay_gap",
        )

    # -------------------------------------------------------------- host drain

    def _init_host(self) -> None:
        if self.store.host(self.section.host) is None:
            self._create(
                Host(name=self.section.host, state=HOST_DRAIN.initial, updated_at=time.time())
            )

    def get_host(self, name: str) -> Host:
        host = self.store.host(name)
        if host is None:
            raise NotFound(f"no host {name!r}")
        allocations = sum(1 for a in self.store.live_allocations() if a.host == name)
        return msgspec.structs.replace(host, allocations=allocations)

    def hosts(self) -> list[Host]:
        return [self.get_host(h.name) for h in self.store.hosts()]

    def _move_host(self, host: Host, target: str, reason: str, **changes: object) -> Host:
        """A host move, then its new state on every route target on the host."""
        new = self._move(host, target, reason, **changes)
        self._route_host_state(new)
        return new

    def _route_host_state(self, host: Host) -> None:
        for route in self.store.routes():
            if any(t.host == host.name and t.host_state != host.state for t in route.targets):
                self._change_route(
                    route.app,
                    lambda targets: [
                        msgspec.structs.replace(t, host_state=host.state)
                        if t.host == host.name
                        else t
                        for t in targets
                    ],
                )

    def cordon_host(self, name: str) -> Host:
        host = self.get_host(name)
        if host.state != "uncordoned":
            return host
        return self._move_host(host, "cordoned", reason="cordoned: no new allocations")

    def uncordon_host(self, name: str) -> Host:
        host = self.get_host(name)
        if host.state == "uncordoned":
            return host
        if not HOST_DRAIN.can(host.state, "uncordoned"):
            raise Conflict(f"host {name} is {host.state}; it cannot be uncordoned now")
        return self._move_host(host, "uncordoned", reason="uncordoned", gates=[])

    def drain_host(self, name: str, deadline_s: float, replace: bool) -> Host:
        host = self.get_host(name)
        if host.state != "cordoned":
            raise Conflict(f"host {name} is {host.state}; cordon it before draining")
        host = self._move_host(host, "evacuating", reason="evacuating allocations")
        self._spawn(self._evacuate(name, deadline_s, replace))
        return host

    async def _evacuate(self, name: str, deadline_s: float, replace: bool) -> None:
        evacuated = [a.id for a in self.store.live_allocations() if a.host == name]
        for allocation_id in evacuated:
            self.drain_allocation(allocation_id, deadline_s)
        limit = time.monotonic() + deadline_s + EVACUATION_SLACK + self._max_grace()
        while time.monotonic() < limit:
            left = [i for i in evacuated if self.get_allocation(i).state not in ALLOCATION.terminal]
            if not left:
                break
            await self.changed.wait(min(1.0, limit - time.monotonic()))
        host = self.get_host(name)
        if host.state != "evacuating":
            return  # uncordoned meanwhile
        pinned = [i for i in evacuated if self.get_allocation(i).active_sessions_at_deadline > 0]
        # One host only: every replacement would need another host's room.
        needs_room = len(evacuated) if replace else 0
        gates = [
            _host_gate(
                "runner_headroom_exists",
                needs_room == 0,
                f"{needs_room} replacement(s) and no other host" if needs_room else "",
            ),
            _host_gate(
                "active_sessions_can_drain",
                not pinned,
                f"sessions active at the deadline on {', '.join(pinned)}" if pinned else "",
            ),
        ]
        # Each refused gate is reported as the failure mode that names its refusal.
        failed = [(HOST_DRAIN.refusal(g.id), g) for g in gates if not g.passed]
        if failed:
            text = "; ".join(f"{refusal.name}: {g.detail}" for refusal, g in failed)
            self._note(host, text, failed[0][0].id, gates=gates)
            return
        host = self._move_host(host, "replacement_ready", reason="evacuated", gates=gates)
        host = self._move_host(host, "upgrading", reason="local runner: nothing to upgrade")
        drift = [
            spec.name
            for spec in self.config.apps
            if spec.digest and not (await verify_artifact(spec))[0]
        ]
        host = self._move_host(host, "postcheck", reason="drift checks")
        if drift:
            self._note(
                host,
                f"drift checks failed: artifacts changed for {', '.join(drift)}",
                "drift_checks_pass",
                gates=[*gates, _host_gate("drift_checks_pass", False)],
            )
            return
        self._move_host(host, "uncordoned", reason="drained and checked")

    def _max_grace(self) -> float:
        return max((spec.drain_grace for spec in self.config.apps), default=0.0)

    # ----------------------------------------------------------------- report

    def machine_report(self) -> MachinesReport:
        """Each machine driven here: instances per state now, reason codes, moves."""
        reasons = self.store.reason_counts()
        moves = self.store.move_counts()
        return MachinesReport(
            at=time.time(),
            machines=[
                MachineReport(
                    name=name,
                    states=self.store.state_counts(table),
                    reasons=reasons.get(name, {}),
                    moves=moves.get(name, {}),
                )
                for name, table in _TABLES.items()
            ],
        )

    # ------------------------------------------------------------------ region

    def _init_region(self) -> None:
        name = self.section.region
        region = self.store.region(name)
        if region is not None:
            return
        region = self._create(Region(name=name, state=REGION.initial, updated_at=time.time()))
        absent = [spec.name for spec in self.config.apps if not Path(spec.artifact).is_file()]
        for state in ("provisioning", "binding_services", "replicating_artifacts"):
            region = self._move(region, state)
        if absent:
            self._move(
                region, "disabled", f"artifact absent: {', '.join(absent)}", "artifact_absent"
            )
        else:
            self._move(region, "eligible", "local region ready")

    def get_region(self) -> Region:
        region = self.store.region(self.section.region)
        assert region is not None, "region is initialised at start"
        return region

    def set_region(self, state: str, reason: str) -> Region:
        region = self.get_region()
        if region.state == state:
            return region
        if not REGION.can(region.state, state):
            raise Conflict(f"region is {region.state}; cannot become {state}")
        return self._move(region, state, reason)
