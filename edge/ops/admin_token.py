"""The admin listener's bearer token: which one, where it lives, and who may do what.

Theory of operation. Mutating admin calls (reload, queue purges and replays) always
need a token, even on loopback: every process on the host reaches a loopback
listener, the apps the edge fronts included. The token is, in order:

1. the operator's `edge.admin_token` (or EDGE_ADMIN_TOKEN): then every call but
   /healthz, /readyz and GET of the gallery page (/gallery, /; the page carries no
   data, it fetches /admin/gallery with the token) needs it, as the operator asked;
2. else the one in `admin_token_file` (default: `admin_token_path`) when that file
   holds one;
3. else one generated at start by `edge run` and written to that file (0600, in a
   0700 folder), removed again when the edge stops.

With 2 and 3, reads (GET) stay open on a loopback listener. The supervisor resolves
the token once and hands it to every worker it starts (WORKER_TOKEN_ENV), so a
restarted worker 0 serves the same token; `edge reload`/`edge status` read the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

import msgspec

from edge.server.config import EdgeSection
from scheduler_client.config_file import is_loopback, parse_address

# Set by the supervisor for its workers only; never an operator setting.
WORKER_TOKEN_ENV = "EDGE_WORKER_ADMIN_TOKEN"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
# The gallery page holds no data (it fetches /admin/gallery, a guarded read), so it is
# served to anyone, but only to reads: a public path must never take a mutating method.
PUBLIC_PAGES = frozenset({"/", "/gallery"})
READ_METHODS = frozenset({"GET", "HEAD"})

logger = logging.getLogger(__name__)


class AdminToken(msgspec.Struct, frozen=True, kw_only=True):
    """The token the admin listener checks, and what may pass without it."""

    value: str
    # GET/HEAD need no token: a loopback listener whose token the operator did not set.
    reads_open: bool
    # The file that holds it ("" for the operator's admin_token), and whether this
    # process generated it (and so removes it at the end).
    path: str = ""
    generated: bool = False


def admin_may(method: str, path: str, authorized: bool, reads_open: bool) -> bool:
    """Whether an admin request may proceed: health always, the gallery page to reads,
    other reads when open, else the token."""
    if path in PUBLIC_PATHS or authorized:
        return True
    if path in PUBLIC_PAGES and method in READ_METHODS:
        return True
    return reads_open and method in READ_METHODS


def admin_token_path(edge: EdgeSection, config_path: str | os.PathLike[str]) -> Path:
    """Where the token file is: admin_token_file (relative to the config's folder), else
    a file per admin address in a folder of this user's under the temp folder."""
    if edge.admin_token_file:
        return Path(config_path).resolve().parent / edge.admin_token_file
    name = re.sub(r"[^0-9A-Za-z.-]", "_", edge.admin_listen)
    return Path(tempfile.gettempdir()) / f"edge-{os.getuid()}" / f"admin-{name}.token"


def read_token_file(path: Path) -> str:
    """The token in `path`, or "" when the file is absent or empty."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _private_folder(folder: Path) -> None:
    """Create `folder` 0700, or refuse one that another user could write to."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    # In a shared temp folder someone else may have made it first, or a symlink:
    # they could then swap the token file for one they know.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{folder} is not a folder of this user's")
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise PermissionError(f"{folder} is writable by other users")


def write_token_file(path: Path, token: str) -> None:
    """Write `token` to `path`, mode 0600, atomically (a reader never sees half of it)."""
    _private_folder(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _reads_open(edge: EdgeSection) -> bool:
    host, _ = parse_address(edge.admin_listen)
    return is_loopback(host)


def resolve_admin_token(edge: EdgeSection, config_path: str | os.PathLike[str]) -> AdminToken:
    """The token `edge run` serves: the operator's, the file's, or a new one written there."""
    operator = edge.admin_bearer_token()
    if operator:
        return AdminToken(value=operator, reads_open=False)
    path = admin_token_path(edge, config_path)
    existing = read_token_file(path)
    if existing:
        return AdminToken(value=existing, reads_open=_reads_open(edge), path=str(path))
    token = secrets.token_urlsafe(32)
    write_token_file(path, token)
    return AdminToken(value=token, reads_open=_reads_open(edge), path=str(path), generated=True)


def worker_admin_token(edge: EdgeSection, config_path: str | os.PathLike[str]) -> AdminToken:
    """The token a worker serves: the supervisor's (so all workers agree), else its own."""
    handed = os.environ.get(WORKER_TOKEN_ENV, "")
    if handed and not edge.admin_bearer_token():
        path = str(admin_token_path(edge, config_path))
        return AdminToken(value=handed, reads_open=_reads_open(edge), path=path)
    return resolve_admin_token(edge, config_path)


def client_admin_token(edge: EdgeSection, config_path: str | os.PathLike[str]) -> str:
    """The token an operator's tool sends: the configured one, else the file's ("" if none)."""
    return edge.admin_bearer_token() or read_token_file(admin_token_path(edge, config_path))


def remove_generated(token: AdminToken) -> None:
    """Remove the token file this process generated, unless another edge has replaced it."""
    if not token.generated:
        return
    path = Path(token.path)
    if read_token_file(path) == token.value:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
