"""One worker process: the front listener (SO_REUSEPORT), periodic upkeep, signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
import ssl
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import uvloop

from edge.http.access_log import open_access_log
from edge.http.front_protocol import FrontConnection
from edge.ops.admin import AdminState, start_admin
from edge.ops.admin_token import remove_generated, worker_admin_token
from edge.ops.gallery_feed import CALL_TIMEOUT as GALLERY_CALL_TIMEOUT
from edge.ops.worker_stats import write_snapshot
from edge.queue.durable_queue import DurableQueue
from edge.queue.replayer import Replayer
from edge.routing.route_follower import RouteFollower
from edge.routing.route_table import RouteTable
from edge.server.config import (
    Config,
    ConfigError,
    LogLevel,
    load_config,
    replay_apps,
    restart_keys,
    restart_refusal,
)
from edge.server.logging_setup import setup_logging
from edge.server.worker_context import (
    WorkerContext,
    budget_limits,
    count_config_check,
    wake_specs,
)
from scheduler_client.client import ControlPlaneClient
from scheduler_client.config_file import parse_address, read_secret
from scheduler_client.task_stop import stop_tasks
from wake.controller import WakeController
from wake.store.url import open_store

SWEEP_INTERVAL = 0.25
SNAPSHOT_EVERY = 2  # sweeps
WAKE_UPKEEP_EVERY = 4  # sweeps: last-seen flush, hot refresh, idle-to-sleep once a second

logger = logging.getLogger(__name__)


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


def raise_open_file_limit() -> None:
    """An ingress holds a socket per client and per upstream: use the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def control_plane_client(
    config: Config,
    config_path: str,
    timeout: float | None = None,
    retries: int | None = None,
) -> ControlPlaneClient | None:
    """The client when a control plane is configured; raises ConfigError without a token.

    `timeout` and `retries` replace the configured ones (the gallery's client)."""
    section = config.control_plane
    if not section.url:
        return None
    token = read_secret(section.token_env, section.token_file, config_path, "control_plane.token")
    return ControlPlaneClient(
        section.url,
        token,
        timeout=float(section.timeout) if timeout is None else timeout,
        retries=section.retries if retries is None else retries,
    )


def edge_id(config: Config, index: int) -> str:
    """This worker's name at the control plane: each worker routes, registers and acks."""
    return f"{socket.gethostname()}/{config.edge.listen}/w{index}"


def build_wake_controller(
    config: Config, client: ControlPlaneClient | None, index: int
) -> WakeController | None:
    """The wake controller when any app scales to zero."""
    if client is None or not any(app.scale_to_zero for app in config.apps):
        return None
    return WakeController(
        open_store(config.edge.store),
        client,
        edge_id=edge_id(config, index),
        budget=budget_limits(config),
        apps=wake_specs(config),
        lease_ttl=float(config.budget.wake_lease_ttl),
    )


def route_stats(follower: RouteFollower, table: RouteTable | None) -> dict[str, float]:
    age = follower.age()
    return {
        "epoch": float(table.epoch) if table is not None else -1.0,
        "table_age_s": age if age is not None else -1.0,
        "stale": 1.0 if follower.stale else 0.0,
        "refused": float(follower.refused),
        "resyncs": float(follower.resyncs),
        "acks": float(follower.acks),
        "ack_seconds": follower.ack_seconds,
    }


def in_flight_by_app(
    addresses: Mapping[str, Iterable[str]],
    requests: Mapping[str, int],
    tunnels: Iterable[str],
) -> dict[str, int]:
    """Requests plus tunnels in flight per app, from counts per upstream address."""
    open_tunnels = Counter(tunnels)
    return {
        app: sum(requests.get(a, 0) + open_tunnels[a] for a in set(app_addresses))
        for app, app_addresses in addresses.items()
    }


class AppsInFlight:
    """What the wake controller asks: requests and tunnels in flight per scale-to-zero app
    in this worker, counted once per wake upkeep (a pass over peers and tunnels)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.counts: dict[str, int] = {}

    def refresh(self) -> None:
        """Count again: the app's routable targets and its hot target, per address."""
        ctx = self.ctx
        table = ctx.route_table
        addresses: dict[str, list[str]] = {}
        for name, route in ctx.apps.items():
            if route.wake is None:
                continue
            targets = table.targets(name) if table is not None else None
            found = [t.address for t in targets or ()]
            hot = route.wake.hot_target(name)
            if hot is not None:
                found.append(hot.address)
            addresses[name] = found
        requests = {
            address: ctx.pool.peer(address).in_flight
            for app_addresses in addresses.values()
            for address in app_addresses
        }
        tunnels = [c.tunnel.peer.address for c in ctx.tunnels if c.tunnel is not None]
        self.counts = in_flight_by_app(addresses, requests, tunnels)

    def __call__(self, app: str) -> int:
        return self.counts.get(app, 0)


async def _wake_upkeep(wake: WakeController) -> None:
    try:
        await wake.upkeep()
    except Exception as exc:  # the store or control plane is down: try again next second
        logger.warning("wake upkeep failed: %r", exc)


async def _mark_seen(wake: WakeController) -> None:
    try:
        await wake.mark_seen()
    except Exception as exc:  # the store is down: try again next second
        logger.debug("publishing last-seen failed: %r", exc)


def freeze_startup_heap() -> None:
    """Collect once, then move what startup left alive (modules, config, the loop and its
    clients: most of the heap) out of the collector's sight. A full (gen 2) collection
    then scans only what came since: without this one took 17-30 ms in a worker, enough
    to land in a wake's release and hold every released request up (issue 14)."""
    gc.collect()
    gc.freeze()


def process_name(index: int) -> str:
    """How this worker's log lines name it."""
    return f"edge worker {index}"


async def serve(
    config_path: str,
    config: Config,
    index: int,
    workers: int,
    stats_dir: Path,
    supervised: bool,
    log_level: LogLevel | None = None,
) -> int:
    raise_open_file_limit()
    loop = asyncio.get_running_loop()
    client = control_plane_client(config, config_path)
    wake = build_wake_controller(config, client, index)
    access_log = open_access_log(config.edge.access_log, index)
    ctx = WorkerContext(config, loop, index, access_log, wake, workers)
    follower = None
    if client is not None:
        follower = RouteFollower(client, edge_id(config, index), ctx.adopt_route_table)
        ctx.follower = follower
        follow_task = loop.create_task(follower.run())
    in_flight = AppsInFlight(ctx)

    def start_wake(current: Config) -> None:
        """At start, or on the reload that adds the first scale-to-zero app."""
        nonlocal wake
        if wake is None:
            wake = build_wake_controller(current, client, index)
        if wake is None:
            return
        ctx.wake = wake
        wake.in_flight = in_flight
        wake.promoted_epochs = ctx.promoted_epochs
        ctx.stats.wake_events = wake.counters
        ctx.stats.wake_phases = wake.phases

    start_wake(config)
    if index == 0:  # one count per edge for each config load (see count_config_check)
        count_config_check(wake, None)
    replayer: Replayer | None = None
    replay_task: asyncio.Task | None = None

    def start_replay() -> None:
        """At start, or on the reload that gives an app its first replay policy."""
        nonlocal replayer, replay_task
        if replayer is not None or wake is None or not replay_apps(ctx.config):
            return
        ctx.queue = DurableQueue(ctx.config.edge.store)
        replayer = Replayer(
            ctx.queue,
            wake,
            edge_id(config, index),
            lambda: replay_apps(ctx.config),
            ctx.stats.queue_event,
        )
        ctx.replayer = replayer
        replay_task = loop.create_task(replayer.run())

    start_replay()
    try:
        sock = listen_socket(config.edge.listen)
    except OSError as exc:
        logger.error("cannot listen on %s: %s", config.edge.listen, exc.strerror)
        return 2
    server = await loop.create_server(
        lambda: FrontConnection(ctx), sock=sock, ssl=tls_context(config), backlog=4096
    )
    gallery_client = None
    if index == 0:  # only worker 0 serves the admin listener
        gallery_client = control_plane_client(
            config, config_path, timeout=GALLERY_CALL_TIMEOUT, retries=0
        )
    admin_state = AdminState(
        ctx,
        stats_dir,
        workers,
        config_path,
        supervised,
        edge_id=edge_id(config, index),
        control_plane=gallery_client,
    )
    admin_runner = None
    if index == 0:
        try:
            token = worker_admin_token(config.edge, config_path)
        except OSError as exc:
            logger.error("admin token file: %s", exc)
            server.close()
            return 2
        try:
            admin_runner = await start_admin(admin_state, config.edge.admin_listen, token)
        except OSError as exc:
            logger.error("cannot listen on admin %s: %s", config.edge.admin_listen, exc.strerror)
            server.close()
            return 2
    admin_state.serving = True
    freeze_startup_heap()
    logger.debug(
        "serving %d app(s) on %s; store %s://; control plane %s; replay %s",
        len(config.apps),
        config.edge.listen,
        config.edge.store.partition("://")[0],  # not the URL: it may carry a password
        config.control_plane.url or "none",
        ", ".join(replay_apps(config)) or "none",
    )

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def reload() -> None:
        try:
            new = load_config(config_path)
        except ConfigError as exc:
            logger.error("reload refused, keeping the running config: %s", exc)
            if index == 0:
                count_config_check(wake, exc)
            return
        keys = restart_keys(ctx.config, new)
        if keys:  # the supervisor refuses these first; a SIGHUP straight to a worker too
            logger.error("%s", restart_refusal(keys))
            if index == 0:
                count_config_check(wake, None)  # it passed the gate, if not adopted
            return
        setup_logging(new.log, process_name(index), log_level)
        start_wake(new)  # before apply: the apps' upstreams take the controller
        if index == 0:
            count_config_check(wake, None)
        ctx.apply(new)
        start_replay()
        logger.info("config reloaded")

    loop.add_signal_handler(signal.SIGHUP, reload)
    # Blocked since start (edge/__main__.py, inherited from the supervisor): a reload
    # forwarded while this worker started is carried out now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    wake_upkeep: asyncio.Task | None = None
    marking: asyncio.Task | None = None
    upkeep_over = asyncio.Event()  # set at shutdown: the upkeep loop stops on it

    async def upkeep() -> None:
        nonlocal wake_upkeep, marking
        tick = 0
        while not upkeep_over.is_set():
            await asyncio.sleep(SWEEP_INTERVAL)
            ctx.sweep()
            tick += 1
            if tick % SNAPSHOT_EVERY == 0:
                ctx.stats.held = ctx.holds.total
                ctx.stats.held_by_app = dict(ctx.holds.by_app)
                ctx.stats.limited = ctx.limited_counts()
                if follower is not None:
                    ctx.stats.route = route_stats(follower, ctx.route_table)
                write_snapshot(stats_dir, ctx.stats.snapshot())
                if ctx.access_log is not None:
                    ctx.access_log.flush()
            if wake is None or tick % WAKE_UPKEEP_EVERY != 0:
                continue
            in_flight.refresh()
            if wake_upkeep is None or wake_upkeep.done():
                wake_upkeep = loop.create_task(_wake_upkeep(wake))
            elif marking is None or marking.done():
                # Putting an app to sleep can hold the upkeep for tens of seconds; what is
                # in flight here must still reach the store, or another process sleeps it.
                marking = loop.create_task(_mark_seen(wake))

    write_snapshot(stats_dir, ctx.stats.snapshot())
    upkeep_task = loop.create_task(upkeep())
    await stop.wait()

    # Graceful stop: no new connections, idle ones closed, in-flight ones finish.
    logger.debug("stopping: %d connection(s) open", len(ctx.connections))
    ctx.draining = True
    server.close()
    for conn in list(ctx.connections):
        conn.drain()
    deadline = loop.time() + ctx.config.edge.shutdown_timeout  # as last reloaded
    while ctx.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if ctx.connections:
        logger.warning(
            "%d connection(s) still open after shutdown_timeout; closed", len(ctx.connections)
        )
    for conn in list(ctx.connections):
        conn._close(abort=True)
    # Each is cancelled and waited for a bounded time (stop_tasks): a cancellation lost in
    # a Redis call must not hold the worker's exit up; each loop also stops on state.
    upkeep_over.set()
    await stop_tasks([upkeep_task], what="worker upkeep")
    ctx.pool.close()
    if replayer is not None and replay_task is not None:
        await stop_tasks([replay_task], what="replayer")  # run() stops on close() as well
        await replayer.close(grace=max(0.0, deadline - loop.time()) + 1.0)
        await ctx.queue.close()  # type: ignore[union-attr]
    if follower is not None:
        follower.stop()
        await stop_tasks([follow_task], what="route follower")
    if wake is not None:
        await wake.close()
    elif client is not None:
        await client.close()
    write_snapshot(stats_dir, ctx.stats.snapshot())
    if ctx.access_log is not None:
        ctx.access_log.close()
    if admin_runner is not None:
        await admin_runner.cleanup()
        remove_generated(token)  # only an unsupervised worker generates its own
    if gallery_client is not None:
        await gallery_client.close()
    return 0


def run_worker(
    config_path: str,
    config: Config,
    index: int,
    workers: int,
    stats_dir: str | None,
    supervised: bool,
    log_level: LogLevel | None = None,
) -> int:
    """Serve a loaded config until SIGTERM (logging already set up from it)."""
    directory = Path(stats_dir) if stats_dir else Path(tempfile.mkdtemp(prefix="edge-stats-"))
    try:
        return uvloop.run(
            serve(config_path, config, index, workers, directory, supervised, log_level)
        )
    except ConfigError as exc:  # e.g. the control plane token is missing
        logger.error("%s", exc)
        return 2
