"""The control-plane wire protocol: msgspec Structs for every body, and typed errors.

Route epochs are one region-wide sequence: every route change takes the next
epoch, and an app's route carries the epoch of its last change. Compare-and-set
is on the app's epoch; the change feed and edge acks use the global sequence.

Each machine's states are a Literal here (the OpenAPI enums and `machines.py`
take them from these), so an answer naming a state this client does not know
fails to decode with the field named, instead of passing as an opaque string.
A `reason_code` is the id of the gate or failure mode (`machines.py`) behind a
`reason`, or "" when the reason names none.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class _Wire(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# ------------------------------------------------------------ machine states

AllocationState = Literal[
    "planned", "pulling", "starting", "ready", "draining", "stopped", "failed"
]
HostState = Literal[
    "cordoned", "evacuating", "replacement_ready", "upgrading", "postcheck", "uncordoned"
]
PromotionState = Literal[
    "requested", "policy_check", "route_cas", "edge_propagating", "healthy", "rolled_back", "failed"
]
RegionState = Literal[
    "requested", "provisioning", "binding_services", "replicating_artifacts", "eligible", "disabled"
]


# ------------------------------------------------------------------ resources


class Allocation(_Wire):
    id: str
    app: str
    state: AllocationState
    address: str = ""  # "127.0.0.1:PORT" once started
    host: str = "local"
    artifact_digest: str = ""
    route_epoch: int = 0  # the app's route epoch when this allocation was granted
    # Set when it becomes ready: False if a promotion replaced the route since the grant.
    routed: bool | None = None
    reason: str = ""
    reason_code: str = ""
    version: int = 0  # bumps on every change; watch long-polls on it
    created_at: float = 0.0
    updated_at: float = 0.0
    drain_deadline: float | None = None
    idempotency_key: str | None = None
    pid: int | None = None
    # The process's start time in clock ticks: adoption after a restart must match it,
    # so a reused pid is never mistaken for the app.
    pid_start_ticks: int | None = None
    active_sessions_at_deadline: int = 0


class GateStatus(_Wire):
    name: str
    passed: bool
    detail: str = ""
    id: str = ""  # the gate's id in machines.py


class Host(_Wire):
    name: str
    state: HostState
    reason: str = ""
    reason_code: str = ""
    allocations: int = 0
    gates: list[GateStatus] = []
    version: int = 0
    updated_at: float = 0.0


class Promotion(_Wire):
    id: str
    app: str
    allocation_id: str
    state: PromotionState
    from_epoch: int = 0
    to_epoch: int = 0
    previous_allocations: list[str] = []
    approval_required: bool = False
    approved: bool = False
    reason: str = ""
    reason_code: str = ""
    late_reports: int = 0
    acked_by: list[str] = []
    waiting_for: list[str] = []
    created_at: float = 0.0
    updated_at: float = 0.0
    deadline: float | None = None


class Region(_Wire):
    name: str
    state: RegionState
    reason: str = ""
    reason_code: str = ""
    version: int = 0
    updated_at: float = 0.0


class RouteTarget(_Wire):
    allocation_id: str
    address: str
    state: AllocationState
    host: str = "local"
    host_state: HostState = "uncordoned"
    # Unix time when a draining allocation is stopped; edges close its sessions then.
    drain_deadline: float | None = None


class AppRoute(_Wire):
    app: str
    epoch: int
    targets: list[RouteTarget] = []
    # Epoch of the last compare-and-set (promotion): allocations granted before it are stale.
    promoted_epoch: int = 0


class RouteSnapshot(_Wire):
    epoch: int
    apps: list[AppRoute] = []
    region: Region | None = None


class RouteChange(_Wire):
    epoch: int
    app: str
    route: AppRoute


class RouteChanges(_Wire):
    epoch: int  # the latest epoch the server knows
    changes: list[RouteChange] = []


class EdgeInfo(_Wire):
    edge_id: str
    acked_epoch: int = 0
    last_seen: float = 0.0
    live: bool = True


class MachineReport(_Wire):
    """One machine as the control plane sees it now, all counts from its store."""

    name: str  # the machine's name in machines.py
    states: dict[str, int] = {}  # state -> instances in it now (states with none left out)
    reasons: dict[str, int] = {}  # reason_code -> journal rows naming it
    moves: dict[str, int] = {}  # "from->to" -> journalled moves (creations and events left out)


class MachinesReport(_Wire):
    """Every machine the control plane drives, for the gallery page."""

    at: float  # the control plane's clock when counted
    machines: list[MachineReport] = []


# -------------------------------------------------------------- request bodies


class CreateAllocation(_Wire):
    app: str
    idempotency_key: str | None = None


class DrainRequest(_Wire):
    deadline_s: float = 30.0


class HostDrainRequest(_Wire):
    deadline_s: float = 30.0
    # Evacuated allocations need replacements elsewhere (the "no headroom" gate).
    replace: bool = True


class RouteCas(_Wire):
    app: str
    expected_epoch: int
    allocation_ids: list[str]


class CreatePromotion(_Wire):
    app: str
    allocation_id: str
    expected_epoch: int | None = None
    propagation_timeout_s: float = 30.0


class EdgeRegistration(_Wire):
    edge_id: str


class EdgeAck(_Wire):
    edge_id: str
    epoch: int


class SetRegion(_Wire):
    state: Literal["eligible", "disabled"]
    reason: str = ""


# -------------------------------------------------------------------- errors

ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "not_found",
    "conflict",
    "gone",
    "too_large",
    "unavailable",
    "internal",
]


class ErrorBody(_Wire, omit_defaults=True):
    error: ErrorCode
    message: str
    reason_code: str = ""  # left out when the error names no gate or failure mode


class ControlPlaneError(Exception):
    """Base of every error the client raises."""

    code: ErrorCode = "internal"
    status = 500

    def __init__(self, message: str, reason_code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason_code = reason_code


class BadRequest(ControlPlaneError):
    code = "bad_request"
    status = 400


class Unauthorized(ControlPlaneError):
    code = "unauthorized"
    status = 401


class NotFound(ControlPlaneError):
    code = "not_found"
    status = 404


class Conflict(ControlPlaneError):
    code = "conflict"
    status = 409


class Gone(ControlPlaneError):
    code = "gone"
    status = 410


class TooLarge(ControlPlaneError):
    code = "too_large"
    status = 413


class Unavailable(ControlPlaneError):
    code = "unavailable"
    status = 503


ERRORS_BY_CODE: dict[str, type[ControlPlaneError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, NotFound, Conflict, Gone, TooLarge, Unavailable)
}
ERRORS_BY_STATUS: dict[int, type[ControlPlaneError]] = {
    cls.status: cls for cls in ERRORS_BY_CODE.values()
}
