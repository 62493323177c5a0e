"""One worker process: the front listener (SO_REUSEPORT), periodic upkeep, signals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import uvloop

from edge.access_log import open_access_log
from edge.admin import AdminState, start_admin
from edge.config import Config, ConfigError, load_config
from edge.front_protocol import FrontConnection
from edge.worker_context import WorkerContext
from edge.worker_stats import write_snapshot
from scheduler_client.config_file import parse_address

SWEEP_INTERVAL = 0.25
SNAPSHOT_EVERY = 2  # sweeps


def listen_socket(address: str) -> socket.socket:
    """A listening socket other workers can bind too (SO_REUSEPORT)."""
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def tls_context(config: Config) -> ssl.SSLContext | None:
    tls = config.edge.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def log(index: int, message: str) -> None:
    print(f"edge worker {index}: {message}", file=sys.stderr, flush=True)


async def serve(
    config_path: str, index: int, workers: int, stats_dir: Path, supervised: bool
) -> int:
    config = load_config(config_path)
    loop = asyncio.get_running_loop()
    ctx = WorkerContext(config, loop, index, open_access_log(config.edge.access_log, index))
    try:
        sock = listen_socket(config.edge.listen)
    except OSError as exc:
        log(index, f"cannot listen on {config.edge.listen}: {exc.strerror}")
        return 2
    server = await loop.create_server(
        lambda: FrontConnection(ctx), sock=sock, ssl=tls_context(config), backlog=4096
    )
    admin_state = AdminState(ctx, stats_dir, workers, config_path, supervised)
    admin_runner = None
    if index == 0:
        try:
            admin_runner = await start_admin(
                admin_state, config.edge.admin_listen, config.edge.admin_bearer_token()
            )
        except OSError as exc:
            log(index, f"cannot listen on admin {config.edge.admin_listen}: {exc.strerror}")
            server.close()
            return 2
    admin_state.serving = True

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def reload() -> None:
        try:
            new = load_config(config_path)
        except ConfigError as exc:
            log(index, f"reload refused, keeping the running config: {exc}")
            return
        ctx.apply(new)
        log(index, "config reloaded")

    loop.add_signal_handler(signal.SIGHUP, reload)

    async def upkeep() -> None:
        tick = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            ctx.sweep()
            tick += 1
            if tick % SNAPSHOT_EVERY == 0:
                write_snapshot(stats_dir, ctx.stats.snapshot())
                if ctx.access_log is not None:
                    ctx.access_log.flush()

    write_snapshot(stats_dir, ctx.stats.snapshot())
    upkeep_task = loop.create_task(upkeep())
    await stop.wait()

    # Graceful stop: no new connections, idle ones closed, in-flight ones finish.
    ctx.draining = True
    server.close()
    for conn in list(ctx.connections):
        conn.drain()
    deadline = loop.time() + config.edge.shutdown_timeout
    while ctx.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(ctx.connections):
        conn._close(abort=True)
    upkeep_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await upkeep_task
    ctx.pool.close()
    write_snapshot(stats_dir, ctx.stats.snapshot())
    if ctx.access_log is not None:
        ctx.access_log.close()
    if admin_runner is not None:
        await admin_runner.cleanup()
    return 0


def run_worker(
    config_path: str,
    index: int,
    workers: int,
    stats_dir: str | None,
    supervised: bool,
) -> int:
    directory = Path(stats_dir) if stats_dir else Path(tempfile.mkdtemp(prefix="edge-stats-"))
    try:
        return uvloop.run(serve(config_path, index, workers, directory, supervised))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
