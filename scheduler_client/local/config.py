"""Config of the local control plane: where it listens, its token, and the apps it can run."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from scheduler_client.config_file import (
    ByteSize,
    ConfigError,
    Duration,
    decode_toml,
    parse_address,
    read_config_file,
    read_secret,
)

_NAME = re.compile(r"[a-z0-9]([a-z0-9_-]{0,62})")
_PLACEHOLDERS = frozenset({"port", "python", "allocation", "app"})


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ControlPlaneSection(_Section):
    listen: str = "127.0.0.1:9400"
    # The bearer token is never written in config: an environment variable or a file.
    token_env: str = "CONTROL_PLANE_TOKEN"
    token_file: str = ""
    state_file: str = "controlplane.sqlite"
    region: str = "local"
    host: str = "local"
    # Allocations this host can run at once; beyond it, creating one fails ("no headroom").
    max_allocations: int = 32
    # Route changes kept for the change feed; older epochs answer 410.
    route_history: int = 1000
    # An edge not seen for this long is not waited for by promotions.
    edge_live_timeout: Duration = Duration(30.0)
    max_body: ByteSize = ByteSize(64 * 1024)
    long_poll_max: Duration = Duration(30.0)


class AppSpec(_Section, kw_only=True):
    name: str
    # argv template; {port}, {python}, {allocation} and {app} are substituted.
    command: list[str]
    env: dict[str, str] = {}
    # Names of environment variables the app needs; missing -> allocation fails.
    secrets: list[str] = []
    artifact: str
    # "sha256:<hex>"; empty means the artifact's digest at config load is trusted.
    digest: str = ""
    readiness_path: str = "/healthz"
    start_timeout: Duration = Duration(20.0)
    drain_grace: Duration = Duration(5.0)
    memory_limit: ByteSize = ByteSize(512 * 1024 * 1024)
    approval_required: bool = False


class ControlPlaneConfig(_Section):
    controlplane: ControlPlaneSection = ControlPlaneSection()
    apps: list[AppSpec] = []

    def app(self, name: str) -> AppSpec | None:
        for spec in self.apps:
            if spec.name == name:
                return spec
        return None


def _check(config: ControlPlaneConfig, file: str) -> None:
    def fail(path: str, problem: str) -> None:
        raise ConfigError(file, path, problem)

    section = config.controlplane
    try:
        parse_address(section.listen)
    except ValueError as exc:
        fail("controlplane.listen", str(exc))
    if section.max_allocations < 1:
        fail("controlplane.max_allocations", "must be at least 1")
    if section.route_history < 1:
        fail("controlplane.route_history", "must be at least 1")
    seen: set[str] = set()
    for i, app in enumerate(config.apps):
        where = f"apps[{i}]"
        if not _NAME.fullmatch(app.name):
            fail(f"{where}.name", f"{app.name!r}: use 1-63 of a-z, 0-9, '-', '_'")
        if app.name in seen:
            fail(f"{where}.name", f"duplicate app name {app.name!r}")
        seen.add(app.name)
        if not app.command:
            fail(f"{where}.command", "must not be empty")
        for j, part in enumerate(app.command):
            for name in re.findall(r"{(\w*)}", part):
                if name not in _PLACEHOLDERS:
                    fail(f"{where}.command[{j}]", f"unknown placeholder {{{name}}}")
        if app.digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", app.digest):
            fail(f"{where}.digest", "expected 'sha256:' followed by 64 hex digits")
        if not app.readiness_path.startswith("/"):
            fail(f"{where}.readiness_path", "must start with '/'")
        if app.start_timeout <= 0:
            fail(f"{where}.start_timeout", "must be greater than zero")


def load_controlplane_config(path: str | Path) -> ControlPlaneConfig:
    """Read and validate; relative artifact paths resolve against the config's folder."""
    file = str(path)
    config = decode_toml(read_config_file(path), file, ControlPlaneConfig)
    _check(config, file)
    base = Path(path).resolve().parent
    apps = [
        msgspec.structs.replace(app, artifact=str((base / app.artifact).resolve()))
        for app in config.apps
    ]
    state_file = str((base / config.controlplane.state_file).resolve())
    section = msgspec.structs.replace(config.controlplane, state_file=state_file)
    return msgspec.structs.replace(config, controlplane=section, apps=apps)


def read_token(section: ControlPlaneSection, file: str = "<config>") -> str:
    """The bearer token from token_file or the environment; ConfigError when absent."""
    return read_secret(section.token_env, section.token_file, file, "controlplane.token")
