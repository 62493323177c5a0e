"""The Wake machine's gates and failure modes are names the edge and wake code use.

Each gate and failure mode of `wake.machine.WAKE` has an id; the code that checks
the gate or sees the failure reports that id (journal reason code, the
`edge_wake_gallery_total` metric). This walks the gallery and finds each id in the
code of `edge/` and `wake/` outside the machine's own declaration.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from wake.machine import WAKE

ROOT = Path(__file__).resolve().parent.parent
DECLARATION = ROOT / "wake" / "machine.py"


def names_in_code() -> set[str]:
    """Every string literal and every defined or called name in edge/ and wake/."""
    found: set[str] = set()
    for package in ("edge", "wake"):
        for path in (ROOT / package).rglob("*.py"):
            if path == DECLARATION:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.add(node.name)
                elif isinstance(node, ast.Name):
                    found.add(node.id)
    return found


CODE = names_in_code()
IDS = [g.id for g in WAKE.gates] + [f.id for f in WAKE.failure_modes]


def test_the_wake_gallery_has_its_four_gates_and_four_failure_modes() -> None:
    assert len(WAKE.gates) == 4 and len(WAKE.failure_modes) == 4
    assert set(IDS) == {
        "request_class_safe_to_hold",
        "wake_budget_available",
        "allocation_passes_readiness",
        "unsafe_replay_policy_exists",
        "payment_webhook_while_cold",
        "wake_stampede",
        "readiness_timeout",
        "old_route_epoch",
    }


@pytest.mark.parametrize("gallery_id", IDS)
def test_each_gate_and_failure_mode_is_used_by_the_code(gallery_id: str) -> None:
    assert gallery_id in CODE, f"{gallery_id} is declared in the gallery but nothing uses it"


def test_an_unused_id_would_be_found_missing() -> None:
    assert "no_such_gallery_entry" not in CODE
