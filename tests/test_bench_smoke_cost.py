"""Smoke run of bench/hot_path_cost.py at --quick size: the edge (limit unset and set
high) and nginx under callgrind, each documented key plausible, and --compare's ratios
to an earlier report. Needs valgrind (scripts/ensure-valgrind, run by `make test`)."""

from __future__ import annotations

import json
from pathlib import Path

from bench_smoke import (
    check_report,
    eq,
    have,
    in_range,
    is_true,
    list_of,
    machine,
    nonneg,
    opt,
    pos,
    run_bench,
    text,
)
from helpers import ROOT

ROWS = ("edge_unset", "edge_limit", "nginx")
ROW_KEYS = {"instr_per_req", "runs", "raw_runs", "run_seconds", "idle_instr_per_s", "spread"}
# Python under valgrind starts in 10-30 s, and make test runs three pytest workers.
TIMEOUT = 300.0
# Instructions per request: the edge is Python (about 1e5 on x86-64), nginx C (about 2e4).
EDGE_RANGE = in_range(10_000, 2_000_000)
NGINX_RANGE = in_range(1_000, 200_000)


def test_hot_path_cost_quick(tmp_path: Path) -> None:
    before = tmp_path / "before.json"
    earlier = {"edge_unset_instr_per_req": 100_000.0, "edge_limit_instr_per_req": None}
    before.write_text(json.dumps({**earlier, "tree": "/elsewhere", "tree_commit": "abc"}))
    report = run_bench(
        "hot_path_cost.py", tmp_path / "cost.json", "--compare", str(before), timeout=TIMEOUT
    )
    nginx = have("nginx")

    def row(figures: object, in_range_check=EDGE_RANGE) -> bool:
        return (
            isinstance(figures, dict)
            and set(figures) == ROW_KEYS
            and in_range_check(figures["instr_per_req"])
            and list_of(in_range_check, 2)(figures["runs"])
            and list_of(in_range_check, 2)(figures["raw_runs"])
            and list_of(pos, 2)(figures["run_seconds"])
            and nonneg(figures["idle_instr_per_s"])
            and in_range(0, 0.05)(figures["spread"])
        )

    def rows(value: dict) -> bool:
        return (
            set(value) == set(ROWS)
            and row(value["edge_unset"])
            and row(value["edge_limit"])
            and (row(value["nginx"], NGINX_RANGE) if nginx else value["nginx"] is None)
        )

    def compared(value: dict) -> bool:
        return isinstance(value, dict) and value == {
            "file": str(before),
            "tree": "/elsewhere",
            "tree_commit": "abc",
            **earlier,
            "unset_vs_before": round(report["edge_unset_instr_per_req"] / 100_000, 4),
            "limit_vs_before": round(report["edge_limit_instr_per_req"] / 100_000, 4),
        }

    check_report(
        "hot_path_cost.py",
        report,
        {
            "edge_unset_instr_per_req": EDGE_RANGE,
            "edge_limit_instr_per_req": EDGE_RANGE,
            "nginx_instr_per_req": NGINX_RANGE if nginx else eq(None),
            "limit_vs_unset": in_range(0.9, 1.5),  # a limit that never binds: a few %
            "edge_vs_nginx": in_range(1.0, 100.0) if nginx else eq(None),
            "spread_max": in_range(0, 0.05),
            "rows": rows,
            "before": compared,
            "tree": eq(str(ROOT)),
            "tree_commit": opt(text),  # null when the checkout is not a git one
            "max_concurrency": eq(10000),
            "requests": eq(300),
            "repeats": eq(2),
            "warmup_requests": eq(100),
            "connections": eq(4),
            "idle_s": eq(1.0),
            "upstream": text,
            "valgrind": lambda v: text(v) and v.startswith("valgrind"),
            "nginx_version": text if nginx else eq(None),
            "machine": machine,
            "notes": list_of(text),
            "quick": is_true,
            "elapsed_s": pos,
        },
    )
    r = report
    assert r["edge_unset_instr_per_req"] == r["rows"]["edge_unset"]["instr_per_req"]
    assert r["edge_limit_instr_per_req"] == r["rows"]["edge_limit"]["instr_per_req"]
    assert r["limit_vs_unset"] == round(
        r["edge_limit_instr_per_req"] / r["edge_unset_instr_per_req"], 4
    )
    spreads = [r["rows"][name]["spread"] for name in ROWS if r["rows"][name] is not None]
    assert r["spread_max"] == max(spreads)
