"""The benchmarks' smoke runs: each bench/ script run as `make bench` would, with --quick
(seconds, not minutes) and --json, then every key its docstring lists under "JSON keys"
checked for a plausible value.

Each test file keeps one checker per documented key; `check_report` fails when the
report's keys, the docstring's and the checkers' differ, so a key added to one of them
alone fails the smoke test.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import ROOT

BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import bench_stack  # noqa: E402 (bench/ is not a package: the benchmarks' own module)

Check = Callable[[Any], bool]
RUN_TIMEOUT = 150.0


def run_bench(
    script: str,
    json_path: Path,
    *args: str,
    exit_code: int = 0,
    timeout: float = RUN_TIMEOUT,
) -> dict[str, Any]:
    """`python bench/SCRIPT --quick --json JSON_PATH ARGS...`; its JSON report."""
    argv = [sys.executable, str(BENCH / script), "--quick", "--json", str(json_path), *args]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # each benchmark stops everything it started on SIGTERM
        _, stderr = proc.communicate(timeout=30)
        raise AssertionError(
            f"{script} still running after {timeout:g}s:\n{stderr[-3000:]}"
        ) from None
    assert proc.returncode == exit_code, (
        f"{script} exited {proc.returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    )
    return json.loads(json_path.read_text())


def documented_keys(script: str) -> list[str]:
    """The keys the script's docstring lists under "JSON keys"."""
    tree = ast.parse((BENCH / script).read_text())
    return bench_stack.doc_keys(ast.get_docstring(tree, clean=False))


def check_report(script: str, report: dict[str, Any], checks: dict[str, Check]) -> None:
    documented = documented_keys(script)
    assert documented, f"{script}: no 'JSON keys' list in its docstring"
    assert len(set(documented)) == len(documented), f"{script}: a key listed twice"
    assert set(checks) == set(documented), (
        f"{script}: checkers without a documented key {sorted(set(checks) - set(documented))}, "
        f"documented keys without a checker {sorted(set(documented) - set(checks))}"
    )
    assert set(report) == set(documented), (
        f"{script}: missing {sorted(set(documented) - set(report))}, "
        f"undocumented {sorted(set(report) - set(documented))}"
    )
    bad = {key: report[key] for key, check in checks.items() if not check(report[key])}
    assert not bad, f"{script}: implausible values {bad}"


# --------------------------------------------------------------------------- checkers


def num(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pos(value: Any) -> bool:
    return num(value) and value > 0


def nonneg(value: Any) -> bool:
    return num(value) and value >= 0


def count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def eq(expected: Any) -> Check:
    return lambda value: value == expected and isinstance(value, bool) == isinstance(expected, bool)


def opt(check: Check) -> Check:
    return lambda value: value is None or check(value)


def text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def is_true(value: Any) -> bool:
    return value is True


def in_range(low: float, high: float) -> Check:
    return lambda value: num(value) and low <= value <= high


def list_of(check: Check, length: int | None = None) -> Check:
    return lambda value: (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(check(item) for item in value)
    )


def dict_of(check: Check, keys: set[str] | None = None) -> Check:
    return lambda value: (
        isinstance(value, dict)
        and (keys is None or set(value) == keys)
        and all(check(item) for item in value.values())
    )


def flags(*required_true: str) -> Check:
    """targets_met: a bool per target plus "all"; `required_true` are behaviour, not speed."""
    return lambda value: (
        isinstance(value, dict)
        and "all" in value
        and all(isinstance(v, bool) for v in value.values())
        and all(value.get(name) is True for name in required_true)
    )


def machine(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and count(value.get("nproc"))
        and value["nproc"] >= 1
        and text(value.get("python"))
        and text(value.get("platform"))
    )


def load_row(value: Any) -> bool:
    """One load run that worked: wrk's figures (or the built-in generator's), no error."""
    return (
        isinstance(value, dict)
        and "error" not in value
        and pos(value.get("rps"))
        and count(value.get("requests"))
        and value["requests"] > 0
        and all(pos(value.get(f"p{q}_ms")) for q in (50, 99))
        and value["p50_ms"] <= value["p99_ms"]
        and count(value.get("non2xx"))
        and count(value.get("socket_errors"))
    )


def have(tool: str) -> bool:
    return bench_stack.find_tool(tool) is not None
