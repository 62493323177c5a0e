"""Operator config: TOML decoded by msgspec into frozen Structs, validated once at load.

Every problem is reported as one `ConfigError` naming the file, the key path and
what is wrong, so `edge check` and `edge run` fail the same way (exit status 2).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from edge.host_pattern import HostPatternError, host_from_header, normalize_host_pattern

ADMIN_TOKEN_ENV = "EDGE_ADMIN_TOKEN"


class ConfigError(Exception):
    """A config that cannot be used; the message names file, key path and problem."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        self.file = file
        self.path = path
        self.problem = problem
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {problem}")


class Duration(float):
    """Seconds, written in config as '250ms', '5s', '1m30s', '2h'."""


class ByteSize(int):
    """Bytes, written in config as '512', '64KiB', '1MiB', '2GB'."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_duration(text: str) -> Duration:
    """'1m30s' -> 90.0; raises ValueError with the accepted forms."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a duration string like '5s' or '250ms', got {text!r}")
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit ms, s, m or h, e.g. '5s'"
        )
    return Duration(total)


def parse_size(text: str | int) -> ByteSize:
    """'64KiB' -> 65536; a bare integer is bytes."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size like '64KiB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return ByteSize(text)
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use bytes or a unit B, KB, KiB, MB, MiB, GB, GiB, e.g. '1MiB'"
        )
    return ByteSize(int(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Duration:
        return parse_duration(value)
    if kind is ByteSize:
        return parse_size(value)
    raise NotImplementedError


def format_duration(seconds: float) -> str:
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    return f"{int(seconds)}s"


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Duration):
        return format_duration(value)
    if isinstance(value, ByteSize):
        return format_size(value)
    raise NotImplementedError(type(value))


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class TlsConfig(_Section):
    cert_file: str
    key_file: str


class EdgeSection(_Section):
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9090"
    # Required when admin_listen is not loopback; may also come from EDGE_ADMIN_TOKEN.
    admin_token: str = ""

    def admin_bearer_token(self) -> str:
        return self.admin_token or os.environ.get(ADMIN_TOKEN_ENV, "")

    workers: int = 1
    store: str = "memory://"
    # Peers whose X-Forwarded-*/Forwarded headers are kept; everyone else's are replaced.
    trusted_proxies: list[str] = []
    shutdown_timeout: Duration = Duration(30.0)
    access_log: str = "off"
    access_log_sample: float = 1.0
    tls: TlsConfig | None = None


class LimitsSection(_Section):
    max_request_line: ByteSize = ByteSize(8 * 1024)
    max_header_bytes: ByteSize = ByteSize(32 * 1024)
    max_headers: int = 100
    max_body: ByteSize = ByteSize(100 * 1024 * 1024)
    header_timeout: Duration = Duration(10.0)
    keepalive_timeout: Duration = Duration(75.0)
    # Per worker process.
    max_connections: int = 10_000


class UpstreamSection(_Section):
    connect_timeout: Duration = Duration(5.0)
    response_header_timeout: Duration = Duration(60.0)
    idle_timeout: Duration = Duration(60.0)
    keepalive_idle: Duration = Duration(30.0)
    max_idle_per_upstream: int = 64


class AppConfig(_Section):
    name: str
    hosts: list[str]
    upstreams: list[str] = []


class Config(_Section):
    edge: EdgeSection = EdgeSection()
    limits: LimitsSection = LimitsSection()
    upstream: UpstreamSection = UpstreamSection()
    apps: list[AppConfig] = []


_PATH_IN_MESSAGE = re.compile(r"^(.*) - at `\$(.*)`$", re.DOTALL)


def _split_validation_error(error: msgspec.ValidationError) -> tuple[str, str]:
    match = _PATH_IN_MESSAGE.match(str(error))
    if match is None:
        return "", str(error)
    return match.group(2).lstrip("."), match.group(1)


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (host, port); raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected 'host:port', got {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), port
        except ValueError:
            raise ValueError(f"bad IPv6 address in {text!r}") from None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if host != "localhost" and host_from_header(host) != host.lower().rstrip("."):
            raise ValueError(f"bad host in {text!r}: use an IP address or a host name") from None
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_store_for_workers(store: str, workers: int) -> str | None:
    """memory:// lives in one process; several workers would each see a different store."""
    if store.startswith("memory://") and workers > 1:
        return (
            f"store memory:// cannot be shared by {workers} workers (wake coalescing, budgets "
            "and queues would split per process): use redis://host:port/db or workers = 1"
        )
    return None


def _check(config: Config, file: str) -> None:
    def fail(path: str, problem: str) -> None:
        raise ConfigError(file, path, problem)

    edge = config.edge
    for key in ("listen", "admin_listen"):
        try:
            parse_address(getattr(edge, key))
        except ValueError as exc:
            fail(f"edge.{key}", str(exc))
    admin_host, _ = parse_address(edge.admin_listen)
    if not is_loopback(admin_host) and not edge.admin_bearer_token():
        fail(
            "edge.admin_token",
            f"admin_listen {edge.admin_listen} is not loopback: set admin_token "
            f"(or the {ADMIN_TOKEN_ENV} environment variable) so the admin API is not open",
        )
    if edge.workers < 1:
        fail("edge.workers", f"must be at least 1, got {edge.workers}")
    memory_store_problem = check_store_for_workers(edge.store, edge.workers)
    if memory_store_problem:
        fail("edge.store", memory_store_problem)
    if not edge.store.startswith(("memory://", "redis://", "rediss://", "unix://")):
        fail("edge.store", f"expected memory:// or redis://host:port/db, got {edge.store!r}")
    for i, cidr in enumerate(edge.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            fail(f"edge.trusted_proxies[{i}]", str(exc))
    if not 0.0 <= edge.access_log_sample <= 1.0:
        fail("edge.access_log_sample", "must be between 0.0 and 1.0")
    if edge.tls is not None:
        for key in ("cert_file", "key_file"):
            if not Path(getattr(edge.tls, key)).is_file():
                fail(f"edge.tls.{key}", f"file not found: {getattr(edge.tls, key)}")

    limits = config.limits
    for key in ("max_request_line", "max_header_bytes", "max_headers", "max_connections"):
        if getattr(limits, key) < 1:
            fail(f"limits.{key}", "must be at least 1")
    for key in ("header_timeout", "keepalive_timeout"):
        if getattr(limits, key) <= 0:
            fail(f"limits.{key}", "must be greater than zero")
    upstream = config.upstream
    for key in ("connect_timeout", "response_header_timeout", "idle_timeout"):
        if getattr(upstream, key) <= 0:
            fail(f"upstream.{key}", "must be greater than zero")
    if upstream.max_idle_per_upstream < 0:
        fail("upstream.max_idle_per_upstream", "must not be negative")

    names: set[str] = set()
    owner_of_host: dict[str, str] = {}
    for i, app in enumerate(config.apps):
        where = f"apps[{i}]"
        if not re.fullmatch(r"[a-z0-9]([a-z0-9_-]{0,62})", app.name):
            fail(f"{where}.name", f"{app.name!r}: use 1-63 of a-z, 0-9, '-', '_'")
        if app.name in names:
            fail(f"{where}.name", f"duplicate app name {app.name!r}")
        names.add(app.name)
        if not app.hosts:
            fail(f"{where}.hosts", f"app {app.name!r} has no hosts")
        for j, pattern in enumerate(app.hosts):
            try:
                host = normalize_host_pattern(pattern)
            except HostPatternError as exc:
                fail(f"{where}.hosts[{j}]", str(exc))
            if host in owner_of_host:
                fail(
                    f"{where}.hosts[{j}]",
                    f"duplicate host {pattern!r}, already used by app {owner_of_host[host]!r}",
                )
            owner_of_host[host] = app.name
        if not app.upstreams:
            fail(f"{where}.upstreams", f"app {app.name!r} has no upstream")
        for j, address in enumerate(app.upstreams):
            try:
                parse_address(address)
            except ValueError as exc:
                fail(f"{where}.upstreams[{j}]", str(exc))


def load_config_text(text: str, file: str = "<config>") -> Config:
    """Decode and validate TOML text; raises ConfigError."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"invalid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        path, problem = _split_validation_error(exc)
        raise ConfigError(file, path, problem) from None
    _check(config, file)
    return config


def load_config(path: str | Path) -> Config:
    """Read, decode and validate a config file; raises ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    return load_config_text(text, str(path))


def effective_config(config: Config) -> dict[str, Any]:
    """The config with every default filled in, as plain data for printing (secrets masked)."""
    data = msgspec.to_builtins(config, enc_hook=_enc_hook)
    if data["edge"]["admin_token"]:
        data["edge"]["admin_token"] = "********"
    return data


def render_toml(data: dict[str, Any]) -> str:
    """Render effective config back as TOML (flat enough for our schema)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return msgspec.json.encode(v).decode()
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    def table(prefix: str, body: dict[str, Any], header: str) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict) and v is not None}
        nested = {k: v for k, v in body.items() if isinstance(v, dict)}
        lines.append(header)
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in nested.items():
            table(f"{prefix}.{k}", v, f"[{prefix}.{k}]")

    for key, body in data.items():
        if isinstance(body, dict):
            table(key, body, f"[{key}]")
        elif isinstance(body, list):
            for item in body:
                table(key, item, f"[[{key}]]")
    return "\n".join(lines)
