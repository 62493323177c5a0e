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
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from edge.http.forward_headers import DEFAULT_CLIENT_IDENTITY_HEADERS, handled_by_edge
from edge.http.host_pattern import HostPatternError, normalize_host_pattern
from edge.queue.replay_policy import DEFAULT_IDENTITY_HEADERS
from scheduler_client.config_file import (
    ByteSize,
    ConfigError,
    Duration,
    PositiveDuration,
    PositiveSize,
    decode_toml,
    is_loopback,
    parse_address,
    read_config_file,
    to_builtins,
)
from wake.store.redis_connection import CLUSTER_SCHEMES, cluster_seeds
from wake.store.url import REDIS_SCHEMES

ADMIN_TOKEN_ENV = "EDGE_ADMIN_TOKEN"
LogLevel = Literal["debug", "info", "warning", "error"]
# The Wake gate checked at load (wake/machine.py): every request class resolves.
REPLAY_POLICY_GATE = "unsafe_replay_policy_exists"
# The densest readiness probing an app may ask for (s).
MIN_PROBE_INTERVAL = 0.001


class GateRefused(ConfigError):
    """A config refused by a Wake gate checked at load; `gate` is the gate's gallery id."""

    def __init__(self, file: str, path: str, problem: str, gate: str) -> None:
        super().__init__(file, path, problem)
        self.gate = gate


def refused_gate(error: ConfigError) -> str:
    """The gallery id of the gate that refused a config ("" when something else did)."""
    return error.gate if isinstance(error, GateRefused) else ""


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class LeaseDuration(Duration):
    """A lease's time to live: its holder renews it every third, so not below 500ms."""

    bounds = Meta(ge=0.5)


class TlsConfig(_Section):
    cert_file: str
    key_file: str


class EdgeSection(_Section):
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9090"
    # Required when admin_listen is not loopback; may also come from EDGE_ADMIN_TOKEN.
    admin_token: str = ""
    # Without admin_token: the token is read from this file, or generated and written
    # there at start (edge/ops/admin_token.py); "" is a file per admin address.
    admin_token_file: str = ""

    def admin_bearer_token(self) -> str:
        return self.admin_token or os.environ.get(ADMIN_TOKEN_ENV, "")

    workers: Annotated[int, Meta(ge=1)] = 1
    store: str = "memory://"
    # Peers whose X-Forwarded-*/Forwarded headers are kept; everyone else's are replaced.
    trusted_proxies: list[str] = []
    # Fields claiming who the client is (its IP, port, path prefix) that the edge does not
    # set itself: dropped unless a trusted proxy sent them.
    client_identity_headers: list[str] = msgspec.field(
        default_factory=lambda: list(DEFAULT_CLIENT_IDENTITY_HEADERS)
    )
    shutdown_timeout: Duration = Duration(30.0)
    access_log: str = "off"
    access_log_sample: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0
    tls: TlsConfig | None = None


class ReplicaAckTimeout(Duration):
    """WAIT's timeout: over 0 (WAIT 0 blocks for ever) and within the store client's
    2 s socket timeout, which would otherwise cut the wait off as a broken connection."""

    bounds = Meta(ge=0.01, le=1.5)


class StoreSection(_Section):
    """What the durable queue asks of Redis before a 202; applies live on reload."""

    # Replicas that must confirm a queued request (WAIT) before its 202; fewer in time:
    # 503 queue_unavailable. 0: the master's acknowledgement is enough.
    min_replicas_acked: Annotated[int, Meta(ge=0, le=16)] = 0
    replica_ack_timeout: ReplicaAckTimeout = ReplicaAckTimeout(0.5)


class LogSection(_Section):
    """The edge's own messages (not the access log): stderr, at this level and above."""

    level: LogLevel = "info"
    # "text": one readable line per message; "json": one JSON object per line.
    format: Literal["text", "json"] = "text"


class LimitsSection(_Section):
    max_request_line: PositiveSize = PositiveSize(8 * 1024)
    max_header_bytes: PositiveSize = PositiveSize(32 * 1024)
    max_headers: Annotated[int, Meta(ge=1)] = 100
    max_body: ByteSize = ByteSize(100 * 1024 * 1024)
    header_timeout: PositiveDuration = PositiveDuration(10.0)
    keepalive_timeout: PositiveDuration = PositiveDuration(75.0)
    # Per worker process.
    max_connections: Annotated[int, Meta(ge=1)] = 10_000
    # Requests parsed ahead of the one being answered on one connection; one more is
    # refused (503) and the connection closes after the answers ahead of it.
    max_pipelined: Annotated[int, Meta(ge=1)] = 16
    # Largest upstream response head (status line and fields); larger -> 502.
    max_response_head: PositiveSize = PositiveSize(64 * 1024)
    # A request body must arrive at least this fast (bytes per second, 0: off) once
    # `body_rate_grace` has passed since its head; slower -> 408. Time the edge itself
    # stops reading (back-pressure, a held body's buffer full) does not count.
    min_body_rate: ByteSize = ByteSize(1024)
    body_rate_grace: Duration = Duration(5.0)


class UpstreamSection(_Section):
    connect_timeout: PositiveDuration = PositiveDuration(5.0)
    response_header_timeout: PositiveDuration = PositiveDuration(60.0)
    idle_timeout: PositiveDuration = PositiveDuration(60.0)
    keepalive_idle: Duration = Duration(30.0)
    max_idle_per_upstream: Annotated[int, Meta(ge=0)] = 64
    # Connections per upstream address per worker (0: no cap); beyond it requests
    # wait for a connection to come back instead of flooding the app's accept queue.
    max_connections_per_upstream: Annotated[int, Meta(ge=0)] = 256
    # Of those, being opened at once (0: no cap): a burst at an allocation with no idle
    # connections (a wake's release) opens them a few at a time; the rest reuse them.
    max_connecting_per_upstream: Annotated[int, Meta(ge=0)] = 32


class ControlPlaneClientSection(_Section):
    # Empty: no control plane; only static upstreams are served.
    url: str = ""
    # The bearer token never sits in this file: an environment variable, or a file.
    token_env: str = "CONTROL_PLANE_TOKEN"
    token_file: str = ""
    token: str = ""  # refused when set, with a message saying where the token goes
    timeout: PositiveDuration = PositiveDuration(5.0)
    retries: Annotated[int, Meta(ge=0, le=10)] = 3


class BudgetSection(_Section):
    """Region-wide wake budget; applies live on reload."""

    max_concurrent_wakes: Annotated[int, Meta(ge=1)] = 20
    max_wakes_per_second: Annotated[float, Meta(gt=0)] = 10.0
    tenant_max_concurrent_wakes: Annotated[int, Meta(ge=1)] = 5
    # A wake's lease; a holder that dies is replaced this long after its last renewal.
    wake_lease_ttl: LeaseDuration = LeaseDuration(10.0)
    # A wake's budget slot; a holder that dies gives it back this long after its last renewal.
    wake_slot_ttl: LeaseDuration = LeaseDuration(30.0)
    # Wakes one client (its address, or the one a trusted proxy forwarded) may start, per
    # worker: a burst, then this many per second; 0 turns the limit off.
    client_wake_rate: Annotated[float, Meta(ge=0)] = 1.0
    client_wake_burst: Annotated[float, Meta(ge=1)] = 20.0


class HoldSection(_Section):
    """Caps on requests held while apps wake, across all apps of a worker."""

    max_held: Annotated[int, Meta(ge=0)] = 10_000
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

    max_attempts: Annotated[int, Meta(ge=1, le=100)]
    # Dedupe window (a repeat key answers with the first id) and the longest a
    # request waits in the queue before it is dead-lettered as expired.
    retention: PositiveDuration
    # "idempotency-key" (that header, else a hash), "header:NAME" (NAME, else
    # Idempotency-Key, else a hash) or "hash" (of method, path, body and the sender's
    # identity: Host, Authorization and identity_headers).
    dedupe_key: str
    # At most limits.max_body and the held-body caps (checked against them at load).
    max_body: PositiveSize
    max_queued: Annotated[int, Meta(ge=1)] = 100_000
    attempt_timeout: PositiveDuration = PositiveDuration(30.0)
    backoff_initial: PositiveDuration = PositiveDuration(1.0)
    backoff_max: PositiveDuration = PositiveDuration(60.0)
    # Entries an edge read but never finished are taken over after this long.
    claim_idle: PositiveDuration = PositiveDuration(60.0)
    # Dead letters kept per app (with their bodies); beyond it the oldest go.
    max_dead_letters: Annotated[int, Meta(ge=1)] = 100_000
    # Headers that tell senders apart, hashed with Host and Authorization into a key
    # made from the request (so two senders of one body are never merged).
    identity_headers: list[str] = msgspec.field(
        default_factory=lambda: list(DEFAULT_IDENTITY_HEADERS)
    )


class ReleaseRampConfig(_Section):
    """After a wake the limit starts at `start` x max_concurrency and doubles every
    `double_every` while the app answers without 5xx (a 5xx restarts the interval)."""

    start: Annotated[float, Meta(gt=0, le=1)] = 0.25
    double_every: PositiveDuration = PositiveDuration(1.0)


class AppConfig(_Section):
    name: str
    hosts: list[str]
    upstreams: list[str] = []
    tenant: str = "default"
    # Woken through the control plane on demand; no static upstreams.
    scale_to_zero: bool = False
    idle_timeout: PositiveDuration = PositiveDuration(300.0)
    hold_timeout: PositiveDuration = PositiveDuration(30.0)
    max_held: Annotated[int, Meta(ge=0)] = 1000
    # Bytes of request bodies held for this app at once (requests with an Idempotency-Key).
    max_held_body_bytes: ByteSize = ByteSize(8 * 1024 * 1024)
    readiness_path: str = "/healthz"
    readiness_timeout: PositiveDuration = PositiveDuration(20.0)
    # The readiness probe's dense interval (wake/decisions.py probe_pause): what the edge
    # may be late noticing the app ready, and what it costs the starting app.
    readiness_probe_interval: PositiveDuration = PositiveDuration(0.005)
    # After a failed wake, no new one before this, doubling per consecutive failure to 60 s.
    wake_backoff: PositiveDuration = PositiveDuration(1.0)
    # A browser (Accept: text/html) held longer than this gets an auto-refreshing page; 0: off.
    starting_page_after: Duration = Duration(0.0)
    # Tried in order before [[classification]] and the defaults, while the app is not hot.
    rules: list[RuleConfig] = []
    replay: ReplayPolicy | None = None
    # Requests forwarded at once to each allocation (upstream peer); the rest wait in the
    # edge, in arrival order. Each worker takes ceil(limit / workers); unset: no limit.
    max_concurrency: Annotated[int, Meta(ge=1)] | None = None
    # Scale-to-zero apps with max_concurrency: true (the defaults) or a table.
    release_ramp: bool | ReleaseRampConfig = False

    def ramp(self) -> ReleaseRampConfig | None:
        """The release ramp after a wake, when one is configured."""
        if isinstance(self.release_ramp, ReleaseRampConfig):
            return self.release_ramp
        return ReleaseRampConfig() if self.release_ramp else None

    def can_queue(self, shared_rules: list[RuleConfig]) -> bool:
        """Whether a request to this app may be queued while the app is not hot."""
        rules = [*self.rules, *shared_rules]
        return self.scale_to_zero and any(r.request_class == "queue" for r in rules)

    def unsafe_replay_policy_exists(self, shared_rules: list[RuleConfig]) -> bool:
        """The Wake gate, checked at load: every class a request can get resolves to hold,
        reject or queue, so an app whose rules can queue has a replay policy."""
        return self.replay is not None or not self.can_queue(shared_rules)


class Config(_Section):
    edge: EdgeSection = EdgeSection()
    store: StoreSection = StoreSection()
    log: LogSection = LogSection()
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


# Read only at start: sockets, the store, the control-plane client, the admin listener's
# token, TLS, files opened, pool sizes, the wake lease. A section name means all its keys.
RESTART_KEYS: tuple[str, ...] = (
    "edge.listen",
    "edge.admin_listen",
    "edge.admin_token",
    "edge.workers",
    "edge.store",
    "edge.tls",
    "edge.access_log",
    "control_plane",
    "budget.wake_lease_ttl",
    "upstream.max_idle_per_upstream",
    "upstream.max_connections_per_upstream",
    "upstream.max_connecting_per_upstream",
)


def restart_keys(running: Config, new: Config) -> list[str]:
    """The keys a reload from `running` to `new` changes that apply only at a restart."""
    changed = []
    for key in RESTART_KEYS:
        section, _, name = key.partition(".")
        old_section, new_section = getattr(running, section), getattr(new, section)
        for field in [name] if name else old_section.__struct_fields__:
            if getattr(old_section, field) != getattr(new_section, field):
                changed.append(f"{section}.{field}")
    return changed


def restart_refusal(keys: list[str]) -> str:
    """What a refused reload says (keys only: values may be secrets)."""
    return (
        "reload refused, keeping the running config: these settings are read at start and "
        f"need a restart: {', '.join(keys)}"
    )


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
    if policy.backoff_max < policy.backoff_initial:
        fail(f"{where}.backoff_max", "must not be below backoff_initial")
    if policy.claim_idle <= policy.attempt_timeout:
        fail(
            f"{where}.claim_idle",
            "must be longer than attempt_timeout, or a live edge's delivery would be taken over",
        )
    if policy.max_body > max_body:
        fail(f"{where}.max_body", f"must not be above limits.max_body ({max_body})")
    source = policy.dedupe_key
    if source not in ("idempotency-key", "hash") and not (
        source.startswith("header:") and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", source[7:])
    ):
        fail(
            f"{where}.dedupe_key",
            f"expected 'idempotency-key', 'hash' or 'header:NAME', got {source!r}",
        )
    for i, name in enumerate(policy.identity_headers):
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            fail(f"{where}.identity_headers[{i}]", f"not a header name: {name!r}")


def _check_edge(edge: EdgeSection, fail: Callable[[str, str], None]) -> None:
    for key in ("listen", "admin_listen"):
        try:
            parse_address(getattr(edge, key))
        except ValueError as exc:
            fail(f"edge.{key}", str(exc))
    admin_host, _ = parse_address(edge.admin_listen)
    if not is_loopback(admin_host) and not (edge.admin_bearer_token() or edge.admin_token_file):
        fail(
            "edge.admin_token",
            f"admin_listen {edge.admin_listen} is not loopback: set admin_token "
            f"(or the {ADMIN_TOKEN_ENV} environment variable, or admin_token_file) "
            "so the admin API is not open",
        )
    memory_store_problem = check_store_for_workers(edge.store, edge.workers)
    if memory_store_problem:
        fail("edge.store", memory_store_problem)
    if not edge.store.startswith(("memory://", *REDIS_SCHEMES)):
        fail(
            "edge.store",
            "expected memory://, redis://host:port/db or "
            f"redis+cluster://host:port[,host:port...], got {edge.store!r}",
        )
    elif edge.store.startswith(CLUSTER_SCHEMES):
        try:
            cluster_seeds(edge.store)
        except ValueError as exc:
            fail("edge.store", str(exc))
    for i, cidr in enumerate(edge.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            fail(f"edge.trusted_proxies[{i}]", str(exc))
    for i, name in enumerate(edge.client_identity_headers):
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            fail(f"edge.client_identity_headers[{i}]", f"not a header field name: {name!r}")
        elif handled_by_edge(name):
            fail(
                f"edge.client_identity_headers[{i}]",
                f"{name} is one the edge handles itself (forwarding, framing or routing)",
            )
    if edge.tls is not None:
        for key in ("cert_file", "key_file"):
            if not Path(getattr(edge.tls, key)).is_file():
                fail(f"edge.tls.{key}", f"file not found: {getattr(edge.tls, key)}")


def _check_control_plane(
    control_plane: ControlPlaneClientSection, fail: Callable[[str, str], None]
) -> None:
    if control_plane.token:
        fail(
            "control_plane.token",
            "never write the token in the config: name an environment variable with "
            "token_env, or a file with token_file",
        )
    if control_plane.url and not re.fullmatch(r"https?://[^/\s]+/?", control_plane.url):
        fail("control_plane.url", f"expected http://host:port, got {control_plane.url!r}")


def _check_app(
    app: AppConfig,
    where: str,
    config: Config,
    owner_of_host: dict[str, str],
    fail: Callable[..., None],
) -> None:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9_-]{0,62})", app.name):
        fail(f"{where}.name", f"{app.name!r}: use 1-63 of a-z, 0-9, '-', '_'")
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
    if not app.readiness_path.startswith("/"):
        fail(f"{where}.readiness_path", "must start with '/'")
    interval = float(app.readiness_probe_interval)
    if not MIN_PROBE_INTERVAL <= interval <= float(app.readiness_timeout):
        fail(
            f"{where}.readiness_probe_interval",
            f"{interval * 1000:g}ms: use at least {MIN_PROBE_INTERVAL * 1000:g}ms (a probe "
            "is a connection to the starting app) and at most readiness_timeout",
        )
    store = config.edge.store
    for j, rule in enumerate(app.rules):
        _check_rule(rule, f"{where}.rules[{j}]", store, fail)
    if not app.unsafe_replay_policy_exists(config.classification):
        fail(
            f"{where}.replay",
            f"app {app.name!r} has rules that queue requests but no replay policy: add "
            "[apps.replay] with max_attempts, retention, dedupe_key and max_body",
            REPLAY_POLICY_GATE,
        )
    if app.replay is not None:
        if store.startswith("memory://"):
            fail(
                f"{where}.replay",
                "durable replay needs the redis:// store: memory:// would lose queued "
                "requests on restart",
            )
        _check_replay(app.replay, f"{where}.replay", config.limits.max_body, fail)
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
    if app.ramp() is not None:
        if app.max_concurrency is None:
            fail(f"{where}.release_ramp", "ramps max_concurrency up after a wake: set it too")
        if not app.scale_to_zero:
            fail(
                f"{where}.release_ramp",
                f"app {app.name!r} does not scale to zero: there is no wake to ramp after",
            )


def _check(config: Config, file: str) -> None:
    """What the field types cannot say: addresses, formats, and keys that depend on others."""

    def fail(path: str, problem: str, gate: str = "") -> None:
        raise GateRefused(file, path, problem, gate) if gate else ConfigError(file, path, problem)

    _check_edge(config.edge, fail)
    if config.store.min_replicas_acked and config.edge.store.startswith("memory://"):
        fail(
            "store.min_replicas_acked",
            "memory:// has no replicas to wait for: use a redis:// or redis+cluster:// store, or 0",
        )
    _check_control_plane(config.control_plane, fail)
    for i, rule in enumerate(config.classification):
        _check_rule(rule, f"classification[{i}]", config.edge.store, fail)
    names: set[str] = set()
    owner_of_host: dict[str, str] = {}
    for i, app in enumerate(config.apps):
        if app.name in names:
            fail(f"apps[{i}].name", f"duplicate app name {app.name!r}")
        names.add(app.name)
        _check_app(app, f"apps[{i}]", config, owner_of_host, fail)


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
