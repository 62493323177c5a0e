"""The Wake machine from the state-machine gallery, declared once as data (no I/O).

Theory of operation. An app is `cold` until a request needs it. The first
request moves it to `wake_requested` (coalesced: one wake however many edges see
it), the budget gate lets it to `starting` (an allocation is asked for),
`readiness_wait` once the allocation has an address, and `hot` when its
readiness path answers. Idle apps go `sleeping` (drained) and back to `cold`.
Any state can fail; a failed app is woken again after a back-off, and a wake
whose allocation was granted under a route epoch since replaced goes back to
`wake_requested` to retry under the new epoch.
"""

from __future__ import annotations

from scheduler_client.machine_spec import FailureMode, Gate, IllegalTransition, MachineSpec

WAKE = MachineSpec(
    name="wake",
    title="Wake",
    states=(
        "cold",
        "wake_requested",
        "starting",
        "readiness_wait",
        "hot",
        "failed",
        "sleeping",
    ),
    initial="cold",
    transitions=(
        ("cold", "wake_requested"),
        ("wake_requested", "starting"),
        ("starting", "readiness_wait"),
        ("readiness_wait", "hot"),
        ("hot", "sleeping"),
        ("sleeping", "cold"),
        # Old route epoch: the allocation is abandoned and the wake retried.
        ("starting", "wake_requested"),
        ("readiness_wait", "wake_requested"),
        # The allocation went away under a hot app: wake again on the next request.
        ("hot", "cold"),
        ("failed", "wake_requested"),
        ("failed", "cold"),
    ),
    from_any=("failed",),
    gates=(
        Gate(
            "request class safe to hold",
            "wake_requested",
            "only requests safe to hold wait in memory; the rest are answered at once",
        ),
        Gate("wake budget available", "starting", "a region-wide wake slot and rate token"),
        Gate("allocation passes readiness", "hot", "the readiness path answered 2xx"),
        Gate(
            "unsafe replay policy exists",
            "wake_requested",
            "every request class resolves to hold, reject or queue (checked at config load)",
        ),
    ),
    failure_modes=(
        FailureMode(
            "payment webhook while cold",
            "wake_requested",
            "an unsafe request is rejected or queued, never held; it still starts the wake",
        ),
        FailureMode(
            "wake stampede", "wake_requested", "many requests at many edges coalesce into one wake"
        ),
        FailureMode("readiness timeout", "failed", "the allocation never became ready in time"),
        FailureMode(
            "old route epoch",
            "wake_requested",
            "the allocation was granted under a replaced route epoch; never routed, retried",
        ),
    ),
)

__all__ = ["WAKE", "IllegalTransition"]
