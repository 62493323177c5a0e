"""Processes a benchmark starts: each in its own group, all stopped on the way out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STOP_GRACE = 5.0


class Processes:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen, Path]:
        log_path = self.logdir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                # Own process group: worker processes are stopped with their parent.
                start_new_session=True,
            )
        self.running.append((name, proc))
        return proc, log_path

    def stop(self, proc: subprocess.Popen) -> None:
        self.running = [(n, p) for n, p in self.running if p is not proc]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_GRACE)
        # Sweep stragglers (e.g. workers whose parent exited first) of the
        # group this process led.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.running)):
            self.stop(proc)
