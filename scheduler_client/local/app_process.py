"""Run one allocation of an app as a local subprocess: spawn, probe, measure, stop, adopt.

Theory of operation. The local control plane runs every allocation as a real
process on a free 127.0.0.1 port. This module is the thin I/O layer it uses;
it owns no state machine and persists nothing:

- `spawn` starts the app's command in a new session (so it is the leader of its
  own process group and session, pgid == sid == pid). The app therefore outlives
  a control-plane restart, and signals go to the whole group: a command that
  forks (a shell, a worker pool) is stopped as one.
- `adopt` re-attaches to such a process after a restart from its recorded pid.
  It is not our child, so its exit code is unknowable: `poll` reads /proc and
  answers -1 once it has vanished (or is a zombie waiting for its new parent).
- `wait_ready`, `active_sessions` speak just enough HTTP/1.1 over a plain
  asyncio connection (one request, `Connection: close`), each bounded by a timeout.
- `terminate` is SIGTERM to the group, a bounded wait, then SIGKILL.

Linux only (/proc). Every wait is bounded; children we spawned are reaped by
`poll`, `terminate` and `kill`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from scheduler_client.http_probe import http_get
from scheduler_client.local.config import AppSpec

HOST = "127.0.0.1"
_CHUNK = 1024 * 1024
_PLACEHOLDER = re.compile(r"{(port|python|allocation|app)}")
# Polling intervals and bounds: short enough to notice a ready app or an exit
# quickly, long enough not to spin.
# Readiness is what every held request waits for, and a probe of a local process is
# cheap: the control plane reports `ready` within 10 ms, and edges act on that at once.
_POLL_MIN = 0.005
_POLL_MAX = 0.01
_PROBE_TIMEOUT = 1.0
_SESSIONS_TIMEOUT = 1.0
_KILL_WAIT = 5.0

logger = logging.getLogger(__name__)


def render_command(
    spec: AppSpec, *, port: int, allocation_id: str, python: str = sys.executable
) -> list[str]:
    """The app's argv with {port}, {python}, {allocation} and {app} substituted.

    Only those four placeholders are replaced (the config refuses any other
    `{name}`), so other braces in an argument — JSON, say — pass through untouched.
    """
    values = {"port": str(port), "python": python, "allocation": allocation_id, "app": spec.name}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], part) for part in spec.command]


def app_environment(
    spec: AppSpec,
    environ: Mapping[str, str],
    *,
    allocation_id: str,
    port: int,
    home: str | os.PathLike[str],
) -> dict[str, str]:
    """The whole environment an app starts with: nothing of `environ` but PATH, LANG and
    the app's declared secrets, then HOME, spec.env, ALLOCATION_ID and PORT."""
    # Never the control plane's whole environment: it holds the control plane's
    # token and every other app's secrets, and an app may be hostile.
    base = {"PATH": environ.get("PATH") or os.defpath, "HOME": os.fspath(home)}
    if environ.get("LANG"):
        base["LANG"] = environ["LANG"]
    secrets = {name: environ[name] for name in spec.secrets if environ.get(name)}
    return {**base, **secrets, **spec.env, "ALLOCATION_ID": allocation_id, "PORT": str(port)}


def missing_secrets(spec: AppSpec, environ: Mapping[str, str]) -> list[str]:
    """Declared secrets absent from `environ`; an empty value counts as absent."""
    return [name for name in spec.secrets if not environ.get(name)]


def _sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


async def file_digest(path: str | os.PathLike[str]) -> str:
    """'sha256:<hex>' of a file, hashed in a worker thread so the loop keeps serving."""
    return await asyncio.to_thread(_sha256_file, path)


async def verify_artifact(spec: AppSpec) -> tuple[bool, str]:
    """(the artifact matches spec.digest, its actual digest).

    An empty spec.digest always matches. An unreadable artifact has actual digest
    "" and matches only when no digest is declared.
    """
    try:
        actual = await file_digest(spec.artifact)
    except OSError:
        actual = ""
    if not spec.digest:
        return True, actual
    return actual == spec.digest, actual


# ---------------------------------------------------------------------- /proc


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces
    # or parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _alive(pid: int) -> bool:
    """The pid exists and is not a zombie (a zombie has exited; only its parent can reap it)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22): its identity with the pid."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None else None


def _session_members(sid: int) -> list[int]:
    """Live pids whose session is `sid`: the app and everything it forked."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        # fields[3] is the session id (stat field 6).
        if fields is not None and fields[3] == str(sid) and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None  # a zombie or kernel thread has no VmRSS line


def _signal_group(pgid: int, signum: int) -> None:
    """Signal the whole process group; fall back to the pid if the group is already gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, signum)
    except PermissionError:
        pass  # the pid was reused by someone else's process: not ours to signal


# ----------------------------------------------------------------------- HTTP


# ----------------------------------------------------------------- the process


class AppProcess:
    """One app process: a child we spawned (`spawn`) or one re-attached by pid (`adopt`)."""

    def __init__(self, pid: int, port: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.port = port
        self._popen = popen
        # For adopted processes: once seen gone, stay gone (the pid may be reused).
        self._gone = False
        self._killed = False
        self.start_ticks = _start_ticks(pid)

    def __repr__(self) -> str:
        kind = "child" if self._popen is not None else "adopted"
        return f"<AppProcess pid={self.pid} {kind} {self.address} exit={self.poll()}>"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def adopted(self) -> bool:
        """True when re-attached by pid: the exit code cannot be known."""
        return self._popen is None

    @classmethod
    def spawn(
        cls,
        spec: AppSpec,
        *,
        port: int,
        allocation_id: str,
        cwd: str | os.PathLike[str],
        environ: Mapping[str, str],
        home: str | os.PathLike[str],
        log_path: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
    ) -> AppProcess:
        """Start the app in its own session; raises OSError when the command cannot start.

        Environment: `app_environment` (declared secrets and PATH/LANG from `environ`;
        `home`, created 0700, as HOME). Output goes to `log_path` (appended) or nowhere.
        """
        argv = render_command(spec, port=port, allocation_id=allocation_id, python=python)
        Path(home).mkdir(mode=0o700, parents=True, exist_ok=True)
        env = app_environment(spec, environ, allocation_id=allocation_id, port=port, home=home)
        log: IO[bytes] | int
        log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session and process group: survives a control-plane restart
                # and a Ctrl-C aimed at the control plane's group; killpg reaches its forks.
                start_new_session=True,
            )
        finally:
            if not isinstance(log, int):
                log.close()  # the child holds its own copy of the descriptor
        logger.debug("allocation %s: started pid %d on port %d", allocation_id, popen.pid, port)
        return cls(popen.pid, port, popen)

    @classmethod
    def adopt(cls, pid: int, port: int, *, start_ticks: int | None = None) -> AppProcess | None:
        """Re-attach to a process spawned before a restart; None if it is gone or a zombie.

        A live pid that does not lead its own session cannot be one `spawn` started
        (the pid was reused): None. Pass the recorded `start_ticks` for an exact check.
        """
        if pid <= 0 or not _alive(pid):
            return None
        try:
            if os.getsid(pid) != pid:
                return None
        except (ProcessLookupError, PermissionError):
            return None
        proc = cls(pid, port, None)
        if start_ticks is not None and proc.start_ticks != start_ticks:
            return None
        return proc

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while running.

        Adopted processes answer -1 once gone, since only their parent saw the code.
        """
        if self._popen is not None:
            return self._popen.poll()  # also reaps the child
        if self._gone:
            return -1
        if not _alive(self.pid) or _start_ticks(self.pid) != self.start_ticks:
            self._gone = True
            return -1
        return None

    def rss_bytes(self) -> int | None:
        """Resident memory of the app and everything it forked; None once it has exited."""
        if self.poll() is not None:
            return None
        main = _rss_of(self.pid)
        if main is None:
            return None
        others = (_rss_of(pid) or 0 for pid in _session_members(self.pid) if pid != self.pid)
        return main + sum(others)

    async def wait_ready(self, path: str, timeout: float) -> str | None:
        """Poll GET <path> until it answers 2xx: None when ready, else why not.

        Reasons: "readiness timeout", or "exited with <code>" when the process ends first.
        """
        deadline = time.monotonic() + timeout
        pause = _POLL_MIN
        while True:
            code = self.poll()
            if code is not None:
                return f"exited with {code}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "readiness timeout"
            try:
                probe_timeout = min(_PROBE_TIMEOUT, remaining)
                status, _ = await http_get(HOST, self.port, path, probe_timeout, body=False)
            except (OSError, TimeoutError, ValueError):
                status = 0  # not listening yet, or not speaking HTTP yet
            if 200 <= status < 300:
                # A 2xx from a process that has just died (e.g. someone else on
                # the port) is not readiness of this allocation.
                code = self.poll()
                return None if code is None else f"exited with {code}"
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _POLL_MAX)

    async def active_sessions(self) -> int:
        """Open long-lived sessions the app reports on GET /sessions; 0 on any error."""
        try:
            status, body = await http_get(HOST, self.port, "/sessions", _SESSIONS_TIMEOUT)
            if status != 200:
                return 0
            active = json.loads(body).get("active", 0)
        except (OSError, TimeoutError, ValueError, AttributeError):
            return 0
        return active if isinstance(active, int) and active >= 0 else 0

    def _group_alive(self) -> bool:
        """The leader or any fork it left behind (same session id) still runs."""
        # poll() reaps our child first: an unreaped leader would still count.
        if self.poll() is None:
            return True
        return not self._pid_reused() and bool(_session_members(self.pid))

    def _pid_reused(self) -> bool:
        """For an exited process: has its pid been taken by a new, unrelated process?"""
        ticks = _start_ticks(self.pid)
        return ticks is not None and ticks != self.start_ticks

    def _signal(self, signum: int) -> None:
        if self._pid_reused():
            return  # never signal a stranger that inherited the pid
        _signal_group(self.pid, signum)

    def _kill_all(self) -> None:
        """SIGKILL the group, plus any fork that moved to another group but kept the session."""
        self._signal(signal.SIGKILL)
        if not self._pid_reused():
            for pid in _session_members(self.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._killed = True

    async def terminate(self, grace: float) -> int | None:
        """SIGTERM the group, wait up to `grace`, then SIGKILL; the exit code.

        For an adopted process: None when it exited by itself (code unknown),
        -SIGKILL when it had to be killed.
        """
        if not self._group_alive():
            return self._result()
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + max(0.0, grace)
        pause = _POLL_MIN
        while self._group_alive() and time.monotonic() < deadline:
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _POLL_MAX)
        if self._group_alive():
            logger.debug("pid %d still running %.1fs after SIGTERM; killing it", self.pid, grace)
            self._kill_all()
            kill_deadline = time.monotonic() + _KILL_WAIT
            while self.poll() is None and time.monotonic() < kill_deadline:
                await asyncio.sleep(_POLL_MIN)
        return self._result()

    def _result(self) -> int | None:
        code = self.poll()
        if self._popen is not None or code is None:
            return code
        return -signal.SIGKILL if self._killed else None

    def kill(self) -> None:
        """SIGKILL the app and its forks now, and reap it (a bounded, normally instant wait)."""
        if not self._group_alive():
            return
        self._kill_all()
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(1.0)
