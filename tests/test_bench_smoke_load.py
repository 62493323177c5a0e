"""Smoke runs of the load benchmarks (throughput, routes, front_ceiling) at --quick size:
each writes its JSON and every documented key holds a plausible value. They also run the
helpers these benchmarks start: bench/naive_proxy.py (throughput's naive_1w row),
bench/fast_upstream.py (routes' hot app; throughput's upstream without nginx) and the
built-in load generator of bench/bench_stack.py (front_ceiling --python-loadgen)."""

from __future__ import annotations

from pathlib import Path

from bench_smoke import (
    check_report,
    count,
    dict_of,
    eq,
    flags,
    have,
    is_true,
    list_of,
    load_row,
    machine,
    nonneg,
    num,
    opt,
    pos,
    run_bench,
    text,
)

ROUTES_TARGETS = {"p99_storm_over_quiet", "storm_rate_min", "edge_catch_up_s_max"}
ROWS = ("direct", "nginx_proxy_1w", "naive_1w", "edge_1w", "nginx_proxy_2w", "edge_2w")


def test_throughput_quick(tmp_path: Path) -> None:
    report = run_bench("throughput.py", tmp_path / "throughput.json")
    nginx = have("nginx")
    # Quick mode installs nothing: nginx rows run only where nginx already is.
    peers = [r for r in ROWS if nginx or not r.startswith("nginx")]
    nginx_figure = pos if nginx else eq(None)
    ratio_keys = {
        "edge_1w/nginx_proxy_1w",
        "edge_1w/naive_1w",
        "edge_2w/nginx_proxy_2w",
        "naive_1w/nginx_proxy_1w",
        "edge_2w/edge_1w",
    }

    def rows(value: dict) -> bool:
        return set(value) == set(ROWS) and all(
            load_row(value[r]) if r in peers else value[r] is None for r in ROWS
        )

    def ratios(value: dict) -> bool:
        return set(value) == ratio_keys and all(
            pos(v) if nginx or "nginx" not in k else v is None for k, v in value.items()
        )

    def tools(value: dict) -> bool:
        return set(value) == {"wrk", "nginx"} and all(
            text(value[t]) if have(t) else value[t] is None for t in value
        )

    def load_generator(value: str) -> bool:
        return text(value) and value.startswith("wrk") == have("wrk")

    check_report(
        "throughput.py",
        report,
        {
            "edge_rps": pos,
            "nginx_rps": nginx_figure,
            "naive_rps": pos,
            "direct_rps": pos,
            "edge_p99_ms": pos,
            "nginx_p99_ms": nginx_figure,
            "naive_p99_ms": pos,
            "edge_2w_rps": pos,
            "nginx_2w_rps": nginx_figure,
            "rows": rows,
            "peers": eq(peers),
            "ratios": ratios,
            "targets": dict_of(pos, {"edge_vs_nginx", "edge_vs_naive", "edge_p99_ms"}),
            "targets_met": flags(),
            "machine": machine,
            "duration_s": eq(1.0),
            "warmup_s": eq(0.0),
            "connections": eq(8),
            "load_generator": load_generator,
            "tools": tools,
            "upstream": text,
            "nginx_version": text if nginx else eq(None),
            "host_header": eq("bench.localhost"),
            "body_bytes": eq(1024),
            "notes": list_of(text),
            "quick": is_true,
            "elapsed_s": pos,
        },
    )
    assert report["edge_rps"] == report["rows"]["edge_1w"]["rps"]
    assert report["ratios"]["edge_1w/naive_1w"] == round(
        report["edge_rps"] / report["naive_rps"], 3
    )


def test_routes_quick(tmp_path: Path) -> None:
    report = run_bench("routes.py", tmp_path / "routes.json")
    check_report(
        "routes.py",
        report,
        {
            "snapshot_apps": eq(500),
            "snapshot_targets": eq(750),  # half the apps have one target, half two
            "snapshot_wire_mib": pos,
            "snapshot_runs": eq(2),
            "snapshot_apply_ms": pos,
            "snapshot_apply_min_ms": pos,
            "snapshot_apply_max_ms": pos,
            "snapshot_decode_ms": pos,
            "snapshot_build_ms": pos,
            "snapshot_memory_mib": pos,
            "snapshot_peak_mib": pos,
            "snapshot_rss_delta_mib": num,
            "snapshot_rss_note": eq(None),
            "change_batch_1000_ms": pos,
            "change_batch_1000_decode_ms": pos,
            "change_batch_1_ms": pos,
            "targets_lookup_ns": pos,
            "quiet": load_row,
            "storm_load": load_row,
            "quiet_after": load_row,
            "p99_quiet_ms": pos,
            "p99_storm_ms": pos,
            "p99_quiet_after_ms": pos,
            "p50_quiet_ms": pos,
            "p50_storm_ms": pos,
            "rps_quiet": pos,
            "rps_storm": pos,
            "rps_quiet_after": pos,
            "p99_storm_over_quiet": pos,
            "storm_rate_requested": eq(50.0),
            "storm_requests": pos,
            "storm_changes_applied": pos,
            "storm_conflicts": count,
            "storm_errors": eq(0),
            "storm_error_examples": eq([]),
            "storm_elapsed_s": pos,
            "storm_rate_achieved": pos,
            "storm_cas_p50_ms": pos,
            "storm_cas_p99_ms": pos,
            "storm_apps": eq(10),
            "storm_concurrency": eq(4),
            "epoch_before_storm": pos,
            "controlplane_epoch_end": pos,
            "edge_epoch_end": pos,
            "edge_epoch_lag_end": count,
            "edge_caught_up_s": nonneg,  # the edge reached the control plane's epoch
            "edge_ack_lag_max_epochs": opt(count),
            "edge_ack_lag_p50_epochs": opt(count),
            "edge_ack_lag_samples": count,
            "edge_resyncs_during_storm": count,
            "edge_refused_during_storm": count,
            "edge_acks_during_storm": count,
            "cpu_percent_quiet": dict_of(nonneg),
            "cpu_percent_storm": dict_of(nonneg),
            "storm_error": eq(None),
            "targets": dict_of(
                pos, {"p99_storm_over_quiet", "storm_rate_min", "edge_catch_up_s_max"}
            ),
            "targets_met": flags("edge_caught_up"),
            "machine": machine,
            "duration_s": eq(1.0),
            "warmup_s": eq(0.0),
            "connections": eq(8),
            "load_generator": text,
            "upstream": text,
            "state_dir": lambda v: v in ("/dev/shm", "tmp"),
            "quick": is_true,
            "elapsed_s": pos,
        },
    )
    r = report
    assert r["snapshot_apply_min_ms"] <= r["snapshot_apply_ms"] <= r["snapshot_apply_max_ms"]
    assert r["snapshot_memory_mib"] <= r["snapshot_peak_mib"]
    # Every CAS request the storm sent ended as applied, a conflict or an error.
    assert r["storm_requests"] == r["storm_changes_applied"] + r["storm_conflicts"]
    assert r["controlplane_epoch_end"] >= r["epoch_before_storm"] + r["storm_changes_applied"]
    assert r["edge_epoch_lag_end"] == r["controlplane_epoch_end"] - r["edge_epoch_end"]


def test_front_ceiling_quick_with_the_built_in_load_generator(tmp_path: Path) -> None:
    report = run_bench("front_ceiling.py", tmp_path / "front.json", "--python-loadgen")
    check_report(
        "front_ceiling.py",
        report,
        {
            "aiohttp_rps": pos,
            "httptools_rps": pos,
            "httptools_over_aiohttp": pos,
            "load_generator": eq("python-asyncio (fallback)"),
            "duration_s": eq(1),
            "warmup_s": eq(0),
            "connections": eq(50),
            "machine": machine,
            "quick": is_true,
        },
    )
    ratio = report["httptools_rps"] / report["aiohttp_rps"]
    assert report["httptools_over_aiohttp"] == round(ratio, 2)
