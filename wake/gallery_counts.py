"""Names of the region-wide gallery counters (`WakeStore.add_counts` / `counts`).

One key per gate outcome and failure mode of a machine, by gallery id, so the
wake controller and the front count the same thing the gallery page shows:
`gate_passed:<id>`, `gate_refused:<id>`, `failure:<id>` (how often it happened)
and `failure:<id>:<outcome>` (how it was answered, e.g. queued or rejected);
`wakes` counts wakes started (one per coalesced stampede).
"""

from __future__ import annotations

WAKES = "wakes"


def gate_passed(gate_id: str) -> str:
    return f"gate_passed:{gate_id}"


def gate_refused(gate_id: str) -> str:
    return f"gate_refused:{gate_id}"


def failure(mode_id: str, outcome: str = "") -> str:
    """A failure mode's count, or (with `outcome`) how many were answered that way."""
    return f"failure:{mode_id}:{outcome}" if outcome else f"failure:{mode_id}"
