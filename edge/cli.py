"""The `edge` command: run, check, reload (and the internal `worker`)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from edge.config import Config, ConfigError, effective_config, load_config, replay_apps
from scheduler_client.config_file import render_toml


def _durability_warning(config: Config) -> str | None:
    """Queued requests survive a Redis restart only with AOF: say so when it is off."""
    apps = replay_apps(config)
    if not apps:
        return None
    import asyncio

    from edge.durable_queue import DurableQueue
    from wake.state_store import StoreUnavailable

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


def _check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    warning = _durability_warning(config)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"# {path}: ok; effective config with defaults:")
    print(render_toml(effective_config(config)))
    return 0


def _reload(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    url = f"http://{config.edge.admin_listen}/admin/reload"
    request = urllib.request.Request(url, method="POST", data=b"")
    token = config.edge.admin_bearer_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(json.loads(response.read()))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"reload refused: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot reach the edge admin at {url}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start the edge")
    run.add_argument("--config", required=True)
    run.add_argument("--workers", type=int, default=None)
    check = commands.add_parser("check", help="validate a config and print it with defaults")
    check.add_argument("file")
    reload = commands.add_parser("reload", help="apply a changed config without a restart")
    reload.add_argument("--config", required=True)
    controlplane = commands.add_parser(
        "controlplane", help="run the local control plane (apps as subprocesses)"
    )
    controlplane.add_argument("--config", required=True)
    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--config", required=True)
    worker.add_argument("--index", type=int, default=0)
    worker.add_argument("--workers", type=int, default=1)
    worker.add_argument("--stats-dir", default=None)
    worker.add_argument("--supervised", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check(args.file)
    if args.command == "reload":
        return _reload(args.config)
    if args.command == "run":
        from edge.supervisor import run as run_edge

        return run_edge(args.config, args.workers)
    if args.command == "controlplane":
        from scheduler_client.controlplane_server import run as run_controlplane

        return run_controlplane(args.config)
    from edge.worker import run_worker

    return run_worker(args.config, args.index, args.workers, args.stats_dir, args.supervised)


if __name__ == "__main__":
    sys.exit(main())
