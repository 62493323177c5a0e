"""Operator config: TOML decoded by msgspec into frozen Structs, validated once at load.

Every problem is reported as one `ConfigError` naming the file, the key path and
what is wrong, so `edge check` and `edge run` fail the same way (exit status 2).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from edge.http.host_pattern import HostPatternError, normalize_host_pattern
from scheduler_client.config_file import (
    ByteSize,
    ConfigError,
    Duration,
    decode_toml,
    is_loopback,
    parse_address,
    read_config_file,
    to_builtins,
)

ADMIN_TOKEN_ENV = "EDGE_ADMIN_TOKEN"


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
    # Connections per upstream address per worker (0: no cap); beyond it requests
    # wait for a connection to come back instead of flooding the app's accept queue.
    max_connections_per_upstream: int = 256


class ControlPlaneClientSection(_Section):
    # Empty: no control plane; only static upstreams are served.
    url: str = ""
    # The bearer token never sits in this file: an environment variable, or a file.
    token_env: str = "CONTROL_PLANE_TOKEN"
    token_file: str = ""
    token: str = ""  # refused when set, with a message saying where the token goes
    timeout: Duration = Duration(5.0)
    retries: int = 3


class BudgetSection(_Section):
    """Region-wide wake budget; applies live on reload."""

    max_concurrent_wakes: int = 20
    max_wakes_per_second: float = 10.0
    tenant_max_concurrent_wakes: int = 5
    # A wake's lease; a holder that dies is replaced this long after its last renewal.
    wake_lease_ttl: Duration = Duration(10.0)


class HoldSection(_Section):
    """Caps on requests held while apps wake, across all apps of a worker."""

    max_held: int = 10_000
    max_held_body_bytes: ByteSize = ByteSize(64 * 1024 * 1024)


class RuleConfig(_Section):
    """One classification rule: every key given must match; `class` decides."""

    request_class: Literal["hold", "reject", "queue"] = msgspec.field(name="class")
    methods: list[str] = []
    path: str = ""
    path_prefix: str = ""
    path_glob: str = ""
    host: str = ""
    header: str = ""
    header_value: str | None = None
    content_type: str = ""


class ReplayPolicy(_Section):
    """How requests of class `queue` are kept and replayed; required for any app that can queue."""

    max_attempts: int
    # Dedupe window (a repeat key answers with the first id) and the longest a
    # request waits in the queue before it is dead-lettered as expired.
    retention: Duration
    # "idempotency-key" (that header, else a hash), "header:NAME" (NAME, else
    # Idempotency-Key, else a hash) or "hash" (of method, path and body).
    dedupe_key: str
    max_body: ByteSize
    max_queued: int = 100_000
    attempt_timeout: Duration = Duration(30.0)
    backoff_initial: Duration = Duration(1.0)
    backoff_max: Duration = Duration(60.0)
    # Entries an edge read but never finished are taken over after this long.
    claim_idle: Duration = Duration(60.0)
    # Dead letters kept per app (with their bodies); beyond it the oldest go.
    max_dead_letters: int = 100_000


class AppConfig(_Section):
    name: str
    hosts: list[str]
    upstreams: list[str] = []
    tenant: str = "default"
    # Woken through the control plane on demand; no static upstreams.
    scale_to_zero: bool = False
    idle_timeout: Duration = Duration(300.0)
    hold_timeout: Duration = Duration(30.0)
    max_held: int = 1000
    # Bytes of request bodies held for this app at once (requests with an Idempotency-Key).
    max_held_body_bytes: ByteSize = ByteSize(8 * 1024 * 1024)
    readiness_path: str = "/healthz"
    readiness_timeout: Duration = Duration(20.0)
    # A browser (Accept: text/html) held longer than this gets an auto-refreshing page; 0: off.
    starting_page_after: Duration = Duration(0.0)
    # Tried in order before [[classification]] and the defaults, while the app is not hot.
    rules: list[RuleConfig] = []
    replay: ReplayPolicy | None = None

    def can_queue(self, shared_rules: list[RuleConfig]) -> bool:
        """Whether a request to this app may be queued while the app is not hot."""
        rules = [*self.rules, *shared_rules]
        return self.scale_to_zero and any(r.request_class == "queue" for r in rules)


class Config(_Section):
    edge: EdgeSection = EdgeSection()
    limits: LimitsSection = LimitsSection()
    upstream: UpstreamSection = UpstreamSection()
    control_plane: ControlPlaneClientSection = ControlPlaneClientSection()
    budget: BudgetSection = BudgetSection()
    hold: HoldSection = HoldSection()
    # Rules for every app, after each app's own.
    classification: list[RuleConfig] = []
    apps: list[AppConfig] = []


def replay_apps(config: Config) -> dict[str, AppConfig]:
    """Apps with a durable queue to replay: a replay policy (every app whose rules can
    queue has one), kept after its queue rules are removed so nothing queued is stranded."""
    return {app.name: app for app in config.apps if app.replay is not None and app.scale_to_zero}


def check_store_for_workers(store: str, workers: int) -> str | None:
    """memory:// lives in one process; several workers would each see a different store."""
    if store.startswith("memory://") and workers > 1:
        return (
            f"store memory:// cannot be shared by {workers} workers (wake coalescing, budgets "
            "and queues would split per process): use redis://host:port/db or workers = 1"
        )
    return None


def _check_rule(rule: RuleConfig, where: str, store: str, fail: Callable[[str, str], None]) -> None:
    if rule.request_class == "queue" and store.startswith("memory://"):
        fail(
            f"{where}.class",
            "queue with the memory:// store would lose queued requests on restart: "
            "use redis://host:port/db",
        )
    for path_key in ("path", "path_prefix"):
        value = getattr(rule, path_key)
        if value and not value.startswith("/"):
            fail(f"{where}.{path_key}", "must start with '/'")
    for j, method in enumerate(rule.methods):
        if not re.fullmatch(r"[A-Za-z]+", method):
            fail(f"{where}.methods[{j}]", f"not an HTTP method: {method!r}")
    if rule.header_value is not None and not rule.header:
        fail(f"{where}.header_value", "needs `header`")


def _check_replay(
    policy: ReplayPolicy, where: str, max_body: int, fail: Callable[[str, str], None]
) -> None:
    if not 1 <= policy.max_attempts <= 100:
        fail(f"{where}.max_attempts", "must be between 1 and 100")
    for key in ("retention", "attempt_timeout", "backoff_initial", "backoff_max", "claim_idle"):
        if getattr(policy, key) <= 0:
            fail(f"{where}.{key}", "must be greater than zero")
    if policy.backoff_max < policy.backoff_initial:
        fail(f"{where}.backoff_max", "must not be below backoff_initial")
    if policy.claim_idle <= policy.attempt_timeout:
        fail(
            f"{where}.claim_idle",
            "must be longer than attempt_timeout, or a live edge's delivery would be taken over",
        )
    if not 1 <= policy.max_body <= max_body:
        fail(f"{where}.max_body", f"must be between 1 byte and limits.max_body ({max_body})")
    for key in ("max_queued", "max_dead_letters"):
        if getattr(policy, key) < 1:
            fail(f"{where}.{key}", "must be at least 1")
    source = policy.dedupe_key
    if source not in ("idempotency-key", "hash") and not (
        source.startswith("header:") and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", source[7:])
    ):
        fail(
            f"{where}.dedupe_key",
            f"expected 'idempotency-key', 'hash' or 'header:NAME', got {source!r}",
        )


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
    if upstream.max_connections_per_upstream < 0:
        fail("upstream.max_connections_per_upstream", "must not be negative")
    if upstream.max_idle_per_upstream < 0:
        fail("upstream.max_idle_per_upstream", "must not be negative")

    control_plane = config.control_plane
    if control_plane.token:
        fail(
            "control_plane.token",
            "never write the token in the config: name an environment variable with "
            "token_env, or a file with token_file",
        )
    if control_plane.url and not re.fullmatch(r"https?://[^/\s]+/?", control_plane.url):
        fail("control_plane.url", f"expected http://host:port, got {control_plane.url!r}")
    if control_plane.timeout <= 0:
        fail("control_plane.timeout", "must be greater than zero")
    if not 0 <= control_plane.retries <= 10:
        fail("control_plane.retries", "must be between 0 and 10")

    budget = config.budget
    for key in ("max_concurrent_wakes", "tenant_max_concurrent_wakes"):
        if getattr(budget, key) < 1:
            fail(f"budget.{key}", "must be at least 1")
    if budget.max_wakes_per_second <= 0:
        fail("budget.max_wakes_per_second", "must be greater than zero")
    if budget.wake_lease_ttl < 0.5:
        fail("budget.wake_lease_ttl", "must be at least 500ms")
    if config.hold.max_held < 0:
        fail("hold.max_held", "must not be negative")

    for i, rule in enumerate(config.classification):
        _check_rule(rule, f"classification[{i}]", edge.store, fail)

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
        if app.scale_to_zero:
            if app.upstreams:
                fail(
                    f"{where}.upstreams",
                    f"app {app.name!r} scales to zero: its instances come from the control "
                    "plane, remove the static upstreams",
                )
            if not config.control_plane.url:
                fail(
                    f"{where}.scale_to_zero",
                    f"app {app.name!r} scales to zero but [control_plane] url is not set",
                )
        elif not app.upstreams:
            fail(f"{where}.upstreams", f"app {app.name!r} has no upstream")
        for key in ("hold_timeout", "readiness_timeout", "idle_timeout"):
            if getattr(app, key) <= 0:
                fail(f"{where}.{key}", "must be greater than zero")
        if app.max_held < 0:
            fail(f"{where}.max_held", "must not be negative")
        if not app.readiness_path.startswith("/"):
            fail(f"{where}.readiness_path", "must start with '/'")
        for j, rule in enumerate(app.rules):
            _check_rule(rule, f"{where}.rules[{j}]", edge.store, fail)
        if app.can_queue(config.classification) and app.replay is None:
            fail(
                f"{where}.replay",
                f"app {app.name!r} has rules that queue requests but no replay policy: add "
                "[apps.replay] with max_attempts, retention, dedupe_key and max_body",
            )
        if app.replay is not None:
            if edge.store.startswith("memory://"):
                fail(
                    f"{where}.replay",
                    "durable replay needs the redis:// store: memory:// would lose queued "
                    "requests on restart",
                )
            _check_replay(app.replay, f"{where}.replay", limits.max_body, fail)
            # A queued body is read whole and counted against the hold caps meanwhile.
            cap = min(int(app.max_held_body_bytes), int(config.hold.max_held_body_bytes))
            if app.replay.max_body > cap:
                fail(
                    f"{where}.replay.max_body",
                    f"{int(app.replay.max_body)} bytes is more than the held-body cap "
                    f"({cap}: max_held_body_bytes of the app and of [hold]); every such "
                    "request would be refused",
                )
        for j, address in enumerate(app.upstreams):
            try:
                parse_address(address)
            except ValueError as exc:
                fail(f"{where}.upstreams[{j}]", str(exc))


def load_config_text(text: str, file: str = "<config>") -> Config:
    """Decode and validate TOML text; raises ConfigError."""
    config = decode_toml(text, file, Config)
    _check(config, file)
    return config


def load_config(path: str | Path) -> Config:
    """Read, decode and validate a config file; raises ConfigError."""
    return load_config_text(read_config_file(path), str(path))


def effective_config(config: Config) -> dict[str, Any]:
    """The config with every default filled in, as plain data for printing (secrets masked)."""
    data = to_builtins(config)
    if data["edge"]["admin_token"]:
        data["edge"]["admin_token"] = "********"
    return data
