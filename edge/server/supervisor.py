"""`edge run`: starts N worker processes on one port, restarts crashed ones, relays signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from edge.server.config import ConfigError, check_store_for_workers, load_config
from edge.server.worker import listen_socket

RESTART_BACKOFF = 1.0
CRASH_LOOP_LIMIT = 5  # quick exits in a row before the supervisor gives up
QUICK_EXIT = 2.0


def _say(message: str) -> None:
    print(f"edge: {message}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, config_path: str, workers: int, shutdown_timeout: float) -> None:
        self.config_path = config_path
        self.workers = workers
        self.shutdown_timeout = shutdown_timeout
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
        self.procs[index] = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self.started_at[index] = time.monotonic()

    def signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def reload(self) -> None:
        self.reload_requested = False
        try:
            load_config(self.config_path)
        except ConfigError as exc:
            _say(f"reload refused, keeping the running config: {exc}")
            return
        _say("reloading workers")
        self.signal_all(signal.SIGHUP)

    def run(self) -> int:
        def on_stop(signum: int, _frame: object) -> None:
            self.stopping = True

        def on_hup(signum: int, _frame: object) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        try:
            for index in range(self.workers):
                self.spawn(index)
            code = self._watch()
        finally:
            self._stop_all()
            shutil.rmtree(self.stats_dir, ignore_errors=True)
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
                    _say(f"worker {index} could not start (exit 2); stopping")
                    return 2
                self.quick_exits = self.quick_exits + 1 if quick else 0
                if self.quick_exits >= CRASH_LOOP_LIMIT:
                    _say(f"workers keep crashing (last exit {code}); stopping")
                    return 1
                _say(f"worker {index} exited with {code}; restarting")
                time.sleep(RESTART_BACKOFF if quick else 0)
                self.spawn(index)
            time.sleep(0.1)
        return 0

    def _stop_all(self) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout + 5.0
        for proc in self.procs.values():
            remaining = max(0.0, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
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


def run(config_path: str, workers: int | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    count = workers or config.edge.workers
    if count < 1:
        print(f"{config_path}: --workers must be at least 1", file=sys.stderr)
        return 2
    problem = check_store_for_workers(config.edge.store, count)
    if problem:
        print(f"{config_path}: edge.store (with --workers {count}): {problem}", file=sys.stderr)
        return 2
    problem = check_listen_free(config.edge.listen)
    if problem:
        _say(problem)
        return 2
    _say(
        f"listening on {config.edge.listen} with {count} worker(s), admin on "
        f"{config.edge.admin_listen}, pid {os.getpid()}"
    )
    return Supervisor(config_path, count, config.edge.shutdown_timeout).run()
