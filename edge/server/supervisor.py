"""`edge run`: starts N worker processes on one port, restarts crashed ones, relays signals."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from edge.ops.admin_token import (
    WORKER_TOKEN_ENV,
    AdminToken,
    remove_generated,
    resolve_admin_token,
)
from edge.server.config import (
    Config,
    ConfigError,
    LogLevel,
    check_store_for_workers,
    load_config,
    restart_keys,
    restart_refusal,
)
from edge.server.logging_setup import setup_logging
from edge.server.worker import listen_socket

RESTART_BACKOFF = 1.0
CRASH_LOOP_LIMIT = 5  # quick exits in a row before the supervisor gives up
QUICK_EXIT = 2.0

logger = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        config_path: str,
        config: Config,
        workers: int,
        log_level: LogLevel | None = None,
        admin_token: AdminToken | None = None,
    ) -> None:
        self.config_path = config_path
        self.admin_token = admin_token
        self.config = config  # the running config, which a reload is checked against
        self.workers = workers
        self.shutdown_timeout = float(config.edge.shutdown_timeout)
        self.log_level = log_level  # --log-level, passed on to every worker
        self.stats_dir = tempfile.mkdtemp(prefix="edge-stats-")
        self.procs: dict[int, subprocess.Popen] = {}
        self.started_at: dict[int, float] = {}
        self.quick_exits = 0
        self.stopping = False
        self.reload_requested = False

    def spawn(self, index: int) -> None:
        command = [
            sys.executable,
            "-m",
            "edge",
            "worker",
            "--config",
            self.config_path,
            "--index",
            str(index),
            "--workers",
            str(self.workers),
            "--stats-dir",
            self.stats_dir,
            "--supervised",
        ]
        if self.log_level is not None:
            command += ["--log-level", self.log_level]
        env = None
        if self.admin_token is not None and self.admin_token.path:
            # One token for every worker, and the same after a restart: resolved once here.
            env = {**os.environ, WORKER_TOKEN_ENV: self.admin_token.value}
        # The worker starts with SIGHUP blocked (the mask is inherited) and unblocks it once
        # its handler is in: a reload forwarded meanwhile waits instead of killing it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.procs[index] = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.started_at[index] = time.monotonic()
        logger.debug("started worker %d, pid %d", index, self.procs[index].pid)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def reload(self) -> None:
        self.reload_requested = False
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            logger.error("reload refused, keeping the running config: %s", exc)
            return
        keys = restart_keys(self.config, config)
        if keys:
            logger.error("%s", restart_refusal(keys))
            return
        self.config = config
        self.shutdown_timeout = float(config.edge.shutdown_timeout)
        setup_logging(config.log, "edge", self.log_level)
        logger.info("reloading workers")
        self.signal_all(signal.SIGHUP)

    def run(self) -> int:
        def on_stop(signum: int, _frame: object) -> None:
            self.stopping = True

        def on_hup(signum: int, _frame: object) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        # Blocked since start (edge/__main__.py): a SIGHUP that came meanwhile is a reload now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        try:
            for index in range(self.workers):
                self.spawn(index)
            code = self._watch()
        finally:
            self._stop_all()
            shutil.rmtree(self.stats_dir, ignore_errors=True)
            if self.admin_token is not None:
                remove_generated(self.admin_token)
        return code

    def _watch(self) -> int:
        while not self.stopping:
            if self.reload_requested:
                self.reload()
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self.stopping:
                    continue
                quick = time.monotonic() - self.started_at[index] < QUICK_EXIT
                if code == 2 and quick:
                    logger.error("worker %d could not start (exit 2); stopping", index)
                    return 2
                self.quick_exits = self.quick_exits + 1 if quick else 0
                if self.quick_exits >= CRASH_LOOP_LIMIT:
                    logger.error("workers keep crashing (last exit %s); stopping", code)
                    return 1
                logger.warning("worker %d exited with %s; restarting", index, code)
                time.sleep(RESTART_BACKOFF if quick else 0)
                self.spawn(index)
            time.sleep(0.1)
        return 0

    def _stop_all(self) -> None:
        logger.debug("stopping %d worker(s)", len(self.procs))
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout + 5.0
        for proc in self.procs.values():
            remaining = max(0.0, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d still running at the deadline; killed", proc.pid)
                proc.kill()
                proc.wait()


def check_listen_free(address: str) -> str | None:
    """A clear message when the port is taken by something that isn't us."""
    try:
        sock = listen_socket(address)
    except OSError as exc:
        return f"cannot listen on {address}: {exc.strerror}"
    sock.close()
    return None


def run(
    config_path: str, config: Config, workers: int | None, log_level: LogLevel | None = None
) -> int:
    """Supervise the workers of a loaded config (logging already set up from it)."""
    count = workers or config.edge.workers
    if count < 1:
        logger.error("%s: --workers must be at least 1", config_path)
        return 2
    problem = check_store_for_workers(config.edge.store, count)
    if problem:
        logger.error("%s: edge.store (with --workers %d): %s", config_path, count, problem)
        return 2
    problem = check_listen_free(config.edge.listen)
    if problem:
        logger.error("%s", problem)
        return 2
    try:
        token = resolve_admin_token(config.edge, config_path)
    except OSError as exc:
        logger.error("%s: admin token file: %s", config_path, exc)
        return 2
    logger.info(
        "listening on %s with %d worker(s), admin on %s, pid %d",
        config.edge.listen,
        count,
        config.edge.admin_listen,
        os.getpid(),
    )
    if token.path:
        # The path, never the token: logs travel further than a 0600 file.
        made = "generated, in" if token.generated else "from"
        logger.info("admin token (mutating admin calls need it): %s %s", made, token.path)
    supervisor = Supervisor(config_path, config, count, log_level, token)
    return supervisor.run()
