"""The `edge` command: run, check, reload, status (and the internal `worker`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from edge.ops.admin_token import client_admin_token
from edge.server.config import (
    Config,
    ConfigError,
    LogSection,
    effective_config,
    load_config,
    replay_apps,
)
from edge.server.logging_setup import LEVELS, setup_logging
from scheduler_client.config_file import parse_address, render_toml


def _durability_warning(config: Config) -> str | None:
    """Queued requests survive a Redis restart only with AOF: say so when it is off."""
    apps = replay_apps(config)
    if not apps:
        return None
    import asyncio

    from edge.queue.durable_queue import DurableQueue
    from wake.store.protocol import StoreUnavailable

    async def aof() -> bool:
        queue = DurableQueue(config.edge.store, op_timeout=3.0)
        try:
            return await queue.aof_enabled()
        finally:
            await queue.close()

    names = ", ".join(sorted(apps))
    try:
        enabled = asyncio.run(aof())
    except StoreUnavailable as exc:
        return f"could not check Redis persistence for queued requests (apps {names}): {exc}"
    if enabled:
        return None
    return (
        f"Redis at {config.edge.store} has no AOF persistence: requests queued for apps "
        f"{names} would be lost if Redis restarts (set appendonly yes, appendfsync always "
        "or everysec)"
    )


def _replica_warning(config: Config) -> str | None:
    """With `[store] min_replicas_acked`, warn when a master has fewer replicas connected."""
    wanted = config.store.min_replicas_acked
    if not wanted or config.edge.store.startswith("memory://"):
        return None
    import asyncio

    from edge.queue.durable_queue import DurableQueue
    from edge.queue.replica_ack import acks_unmet
    from wake.store.protocol import StoreUnavailable

    async def fewest() -> int:
        queue = DurableQueue(config.edge.store, op_timeout=3.0)
        try:
            return await queue.fewest_replicas()
        finally:
            await queue.close()

    try:
        return acks_unmet(wanted, asyncio.run(fewest()))
    except StoreUnavailable as exc:
        return f"could not count Redis replicas for min_replicas_acked = {wanted}: {exc}"


def _cluster_report(store: str) -> tuple[str | None, str | None]:
    """(what to report, what to warn about) for a redis+cluster:// store, else (None, None)."""
    import asyncio

    from wake.store.protocol import StoreUnavailable
    from wake.store.redis_connection import SLOTS, cluster_state, is_cluster

    if not is_cluster(store):
        return None, None
    try:
        state = asyncio.run(cluster_state(store))
    except StoreUnavailable as exc:
        return None, f"could not reach the Redis Cluster: {exc}"
    report = (
        f"Redis Cluster {state.state}: {state.slots_covered}/{SLOTS} slots covered, "
        f"{state.masters} masters, {state.replicas} replicas"
    )
    problems = []
    if state.state != "ok":
        problems.append(f"the cluster says cluster_state:{state.state}")
    if state.slots_covered < SLOTS:
        problems.append(f"{SLOTS - state.slots_covered} slots are not served")
    if state.masters_without_replica:
        problems.append(
            f"{state.masters_without_replica} masters have no replica: losing one loses "
            "its slots' data"
        )
    return report, "; ".join(problems) or None


def _load(path: str) -> Config | None:
    """The config, or None once the problem is printed (the caller exits 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _check(path: str) -> int:
    config = _load(path)
    if config is None:
        return 2
    warning = _durability_warning(config)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    replica_warning = _replica_warning(config)
    if replica_warning:
        print(f"warning: {replica_warning}", file=sys.stderr)
    report, cluster_warning = _cluster_report(config.edge.store)
    if cluster_warning:
        print(f"warning: {cluster_warning}", file=sys.stderr)
    if report:
        print(f"# store: {report}")
    print(f"# {path}: ok; effective config with defaults:")
    print(render_toml(effective_config(config)))
    return 0


def _admin_call(config: Config, config_path: str, method: str, path: str) -> bytes:
    """One admin API call (bearer token from the config or the edge's token file);
    raises urllib/OS errors."""
    host, port = parse_address(config.edge.admin_listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{port}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    token = client_admin_token(config.edge, config_path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def _refusal(body: bytes) -> str:
    """The admin API's reason for refusing a reload, as one line for the operator."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, str):
        error = body.decode(errors="replace").strip()
    return error if error.startswith("reload refused") else f"reload refused: {error}"


def _reload(path: str) -> int:
    config = _load(path)
    if config is None:
        return 2
    try:
        print(json.loads(_admin_call(config, path, "POST", "/admin/reload")))
        return 0
    except urllib.error.HTTPError as exc:
        if exc.code == 401:  # the token in this file is not the one the edge started with
            print(
                "reload refused: the running edge does not accept this config's admin token "
                "(edge.admin_token is read at start: restart to change it)",
                file=sys.stderr,
            )
            return 2
        print(_refusal(exc.read()), file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot reach the edge admin at {config.edge.admin_listen}: {exc}", file=sys.stderr)
        return 1


def _samples(metrics: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name
    ]


def _rejections(metrics: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for labels, value in _samples(metrics, "edge_rejections_total"):
        totals[labels["reason"]] = totals.get(labels["reason"], 0) + int(value)
    return totals


def _status(path: str, as_json: bool, window: float) -> int:
    """Budget in use per tenant, apps by wake state, held requests, 503s by reason
    (since start, and over the last `window` seconds)."""
    config = _load(path)
    if config is None:
        return 2
    try:
        earlier = _admin_call(config, path, "GET", "/metrics").decode() if window > 0 else ""
        time.sleep(window)
        apps = json.loads(_admin_call(config, path, "GET", "/admin/apps"))
        metrics = _admin_call(config, path, "GET", "/metrics").decode()
    except urllib.error.HTTPError as exc:
        print(
            f"admin API refused: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr
        )
        return 2
    except OSError as exc:
        print(f"cannot reach the edge admin at {config.edge.admin_listen}: {exc}", file=sys.stderr)
        return 1
    rejections = _rejections(metrics)
    before = _rejections(earlier) if earlier else {}
    recent = {r: n - before.get(r, 0) for r, n in rejections.items() if n > before.get(r, 0)}
    queued = {labels["app"]: int(v) for labels, v in _samples(metrics, "edge_queue_depth")}
    status = {
        "budget": apps["budget"],
        "apps": [
            {
                "name": row["name"],
                "state": row["state"],
                "held": row["held"],
                "queued": queued.get(row["name"]),
                "allocation_id": row.get("allocation_id", ""),
            }
            for row in apps["apps"]
        ],
        "held_total": int(sum(v for _, v in _samples(metrics, "edge_held_requests"))),
        "rejections_by_reason": rejections,
        "recent_window_s": window,
        "recent_rejections_by_reason": recent if window > 0 else None,
    }
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    budget = status["budget"]
    if budget is not None:
        tenants = ", ".join(f"{t} {n}" for t, n in sorted(budget["by_tenant"].items())) or "-"
        print(
            f"wake budget: {budget['in_use']} of {budget['limit']} in use, "
            f"{budget['waiting']} waiting; by tenant: {tenants}"
        )
    states: dict[str, int] = {}
    for row in status["apps"]:
        states[row["state"]] = states.get(row["state"], 0) + 1
    print("apps by state: " + ", ".join(f"{s} {n}" for s, n in sorted(states.items())))
    print(f"held requests: {status['held_total']}")
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(rejections.items())) or "none"
    print(f"503s since start, by reason: {reasons}")
    if window > 0:
        latest = ", ".join(f"{r} {n}" for r, n in sorted(recent.items())) or "none"
        print(f"503s in the last {window:g}s, by reason: {latest}")
    print()
    width = max([len(row["name"]) for row in status["apps"]] + [3])
    print(f"{'app':<{width}}  {'state':<16} {'held':>6} {'queued':>7}  allocation")
    for row in status["apps"]:
        depth = "-" if row["queued"] is None else str(row["queued"])
        print(
            f"{row['name']:<{width}}  {row['state']:<16} {row['held']:>6} {depth:>7}  "
            f"{row['allocation_id'] or '-'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start the edge")
    run.add_argument("--config", required=True)
    run.add_argument("--workers", type=int, default=None)
    run.add_argument("--log-level", choices=LEVELS, help="overrides [log] level")
    check = commands.add_parser("check", help="validate a config and print it with defaults")
    check.add_argument("file")
    reload = commands.add_parser("reload", help="apply a changed config without a restart")
    reload.add_argument("--config", required=True)
    status = commands.add_parser(
        "status", help="wake budget in use, apps by wake state, held requests, 503s by reason"
    )
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument(
        "--window", type=float, default=2.0, help="seconds over which recent 503s are counted"
    )
    controlplane = commands.add_parser(
        "controlplane", help="run the local control plane (apps as subprocesses)"
    )
    controlplane.add_argument("--config", required=True)
    controlplane.add_argument("--log-level", choices=LEVELS, default="info")
    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--config", required=True)
    worker.add_argument("--index", type=int, default=0)
    worker.add_argument("--workers", type=int, default=1)
    worker.add_argument("--stats-dir", default=None)
    worker.add_argument("--supervised", action="store_true")
    worker.add_argument("--log-level", choices=LEVELS)
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check(args.file)
    if args.command == "reload":
        return _reload(args.config)
    if args.command == "status":
        if not 0 <= args.window <= 60:
            parser.error("--window must be between 0 and 60 seconds")
        return _status(args.config, args.json, args.window)
    if args.command == "controlplane":
        from scheduler_client.local.server import run as run_controlplane

        setup_logging(LogSection(), "controlplane", args.log_level)
        return run_controlplane(args.config)
    config = _load(args.config)
    if config is None:
        return 2
    if args.command == "run":
        from edge.server.supervisor import run as run_edge

        setup_logging(config.log, "edge", args.log_level)
        return run_edge(args.config, config, args.workers, args.log_level)
    from edge.server.worker import process_name, run_worker

    setup_logging(config.log, process_name(args.index), args.log_level)
    return run_worker(
        args.config,
        config,
        args.index,
        args.workers,
        args.stats_dir,
        args.supervised,
        args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
