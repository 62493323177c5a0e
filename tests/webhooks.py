"""Webhook apps and queueing edges for tests: the sample app recording every /hooks/
delivery, run by the local control plane, behind an edge that queues POST /hooks/*."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stack import CONTROL_PLANE_TOKEN, sample_app_spec

HOST = "shop.localhost"
QUEUE_RULES = [{"class": "queue", "methods": ["POST"], "path_prefix": "/hooks/"}]


def replay_policy(**overrides: Any) -> dict[str, Any]:
    policy = {
        "max_attempts": 3,
        "retention": "1h",
        "dedupe_key": "header:X-Event-Id",
        "max_body": "64KiB",
        "attempt_timeout": "5s",
        "backoff_initial": "100ms",
        "backoff_max": "500ms",
        "claim_idle": "6s",
    }
    policy.update(overrides)
    return policy


def shop(rules=QUEUE_RULES, **overrides: Any) -> dict[str, Any]:
    app = {
        "name": "shop",
        "hosts": [HOST],
        "scale_to_zero": True,
        "hold_timeout": "20s",
        "readiness_timeout": "15s",
        "rules": rules,
    }
    if any(rule["class"] == "queue" for rule in rules):
        app["replay"] = replay_policy()
    app.update(overrides)
    return app


class WebhookApp:
    """The sample app as the control plane runs it, recording every /hooks/ request."""

    def __init__(
        self, tmp: Path, start_delay: float = 1.0, statuses: str = "200", gated: bool = False
    ) -> None:
        """`gated`: every allocation stays starting (503) until `open()`, whatever the time."""
        self.record = tmp / "deliveries.jsonl"
        self.status_file = tmp / "statuses.txt"
        self.status_file.write_text(statuses)
        self.gate = tmp / "ready"
        spec = sample_app_spec("shop")
        spec["command"] = spec["command"] + [
            "--start-delay",
            str(start_delay),
            "--record",
            str(self.record),
            "--status-file",
            str(self.status_file),
        ]
        if gated:
            spec["command"] += ["--ready-file", str(self.gate)]
        self.spec = spec

    def open(self) -> None:
        """Let a gated app's allocations become ready (after their start delay)."""
        self.gate.touch()

    def deliveries(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def successes(self) -> list[dict[str, Any]]:
        """The deliveries the app answered 200."""
        return [d for d in self.deliveries() if d["status"] == 200]


def start_queue_edge(
    start_edge, cp, store: str, app: dict[str, Any], store_section: dict | None = None, **edge: Any
):
    """An edge queueing for `app` on `store`; `store_section`: its [store] table."""
    sections = {"control_plane": {"url": cp.url}, "budget": {"wake_lease_ttl": "2s"}}
    if store_section:
        sections["store"] = store_section
    return start_edge(
        apps=[app],
        edge={"store": store, **edge},
        sections=sections,
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )
