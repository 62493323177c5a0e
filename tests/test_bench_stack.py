"""bench/bench_stack.py's pure helpers: the "JSON keys" list a report is held to, --quick
presets, percentiles, Server-Timing and wrk output parsing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from bench_smoke import bench_stack, documented_keys

DOC = """Title.

    not_a_key        an indented line before the list

JSON keys (--json FILE):
    alpha            the first
                     (its description goes on)
    beta_ms
    gamma            the last

    delta            after the blank line: not listed
"""

WRK = """Running 1s test @ http://127.0.0.1:1/
  Latency Distribution
     50%   52.00us
     75%    1.50ms
     90%    2.00s
     99%    1.00m
  12345 requests in 1.00s, 1.00MB read
  Non-2xx or 3xx responses: 7
  Socket errors: connect 1, read 2, write 3, timeout 4
Requests/sec:  12345.67
"""


def test_doc_keys_are_the_lines_indented_four_spaces_up_to_a_blank_line() -> None:
    assert bench_stack.doc_keys(DOC) == ["alpha", "beta_ms", "gamma"]
    assert bench_stack.doc_keys("No list here.") == []


def test_every_benchmark_documents_its_json_keys() -> None:
    for script in ("throughput.py", "routes.py", "front_ceiling.py", "stampede.py"):
        assert len(documented_keys(script)) >= 9, script
    for script in ("webhooks.py", "stampede_report.py"):
        assert len(documented_keys(script)) >= 20, script


def test_write_json_writes_then_refuses_keys_the_docstring_does_not_list(tmp_path: Path) -> None:
    path = tmp_path / "out" / "r.json"
    bench_stack.write_json(path, {"alpha": 1, "beta_ms": 2.5, "gamma": None}, DOC)
    assert json.loads(path.read_text()) == {"alpha": 1, "beta_ms": 2.5, "gamma": None}
    with pytest.raises(RuntimeError, match=r"missing \['gamma'\], extra \['delta'\]"):
        bench_stack.write_json(path, {"alpha": 1, "beta_ms": 2, "delta": 3}, DOC)
    assert json.loads(path.read_text())["delta"] == 3  # written all the same
    bench_stack.write_json(path, {"storm_error": "x"}, DOC, strict=False)


def test_quick_presets_replace_defaults_but_not_options_given() -> None:
    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        parser.add_argument("--duration", type=float, default=10.0)
        parser.add_argument("--connections", type=int, default=50)
        bench_stack.add_quick(parser, {"duration": 1.0, "connections": 8})
        args = parser.parse_args(argv)
        bench_stack.apply_quick(parser, args)
        return args

    assert vars(parse()) == {"duration": 10.0, "connections": 50, "quick": False}
    assert vars(parse("--quick")) == {"duration": 1.0, "connections": 8, "quick": True}
    quick = parse("--quick", "--connections", "3")
    assert (quick.duration, quick.connections) == (1.0, 3)


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [bench_stack.percentile(values, q) for q in (0, 20, 50, 99, 100)] == [1, 1, 3, 5, 5]
    assert bench_stack.percentile([], 50) is None


def test_wake_wait_is_the_wake_entry_of_server_timing() -> None:
    assert bench_stack.wake_wait_ms("edge;dur=0.2, wake;desc=x;dur=812.5") == 812.5
    assert bench_stack.wake_wait_ms("edge;dur=0.2") is None
    assert bench_stack.wake_wait_ms("wake;dur=soon") is None
    assert bench_stack.wake_wait_ms(None) is None


def test_parse_wrk_reads_rate_count_latencies_and_failures() -> None:
    assert bench_stack.parse_wrk(WRK) == {
        "rps": 12345.67,
        "requests": 12345,
        "p50_ms": 0.052,
        "p75_ms": 1.5,
        "p90_ms": 2000.0,
        "p99_ms": 60000.0,
        "non2xx": 7,
        "socket_errors": 10,
    }
    assert bench_stack.parse_wrk("")["rps"] is None
