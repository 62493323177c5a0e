"""Header rewriting for forwarding, both directions: plain functions on byte pairs, no I/O.

Hop-by-hop fields (RFC 9110 §7.6.1) and every field named in `Connection` are
dropped; framing is decided by the edge, never copied. Client-supplied
forwarding and client-identity fields (and X-Request-Id) survive only from trusted
proxies. Each head is scanned once: field names are classified through a small
cache, so the common case costs one dict lookup per field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from http import HTTPStatus

from wake.store.protocol import WakePhases

Header = tuple[bytes, bytes]

# Field classes.
KEEP = 0
DROP = 1  # hop-by-hop, or written by the edge itself
CONNECTION = 2
FORWARDING = 3  # X-Forwarded-Proto/-Host, Forwarded
XFF = 4
REQUEST_ID = 5
HOST = 6
CONTENT_LENGTH = 7
TRANSFER_ENCODING = 8
EXPECT = 9
UPGRADE = 10
IDEMPOTENCY_KEY = 11  # forwarded as is; makes a request safe to hold
ACCEPT = 12  # forwarded as is; a browser may get a "starting up" page while held
IDENTITY = 13  # claims about the client (its IP, port, prefix): only trusted proxies' pass

# Client-identity fields the edge does not set itself: dropped unless a trusted proxy
# sent them (`[edge] client_identity_headers` replaces this list).
DEFAULT_CLIENT_IDENTITY_HEADERS = (
    "X-Real-IP",
    "True-Client-IP",
    "X-Client-IP",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Server",
    "X-Forwarded-Scheme",
    "X-Forwarded-Ssl",
    "X-Cluster-Client-IP",
    "X-Original-Forwarded-For",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
)

_CLASS_BY_NAME = {
    b"connection": CONNECTION,
    b"keep-alive": DROP,
    b"proxy-connection": DROP,
    b"te": DROP,
    b"trailer": DROP,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"proxy-authenticate": DROP,
    b"proxy-authorization": DROP,
    b"x-forwarded-for": XFF,
    b"x-forwarded-proto": FORWARDING,
    b"x-forwarded-host": FORWARDING,
    b"forwarded": FORWARDING,
    b"x-request-id": REQUEST_ID,
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"expect": EXPECT,
    b"idempotency-key": IDEMPOTENCY_KEY,
    b"accept": ACCEPT,
}
# Request-only meanings don't apply to responses: those fields pass through there.
_KEPT_IN_RESPONSE = tuple(
    kind in (KEEP, FORWARDING, XFF, REQUEST_ID, HOST, EXPECT, IDEMPOTENCY_KEY, ACCEPT, IDENTITY)
    for kind in range(IDENTITY + 1)
)
_CACHE_LIMIT = 4096
# Tokens in `Connection` that name no other field worth stripping.
_PLAIN_CONNECTION_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade"})

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def handled_by_edge(name: str) -> bool:
    """Whether the edge gives this field a meaning of its own (it cannot be an identity field)."""
    return name.lower().encode("latin-1") in _CLASS_BY_NAME


class HeaderClasses:
    """Field name -> class, with the configured client-identity fields; one per config.

    Names are classified through a small cache keyed by the name as sent, so the
    common case costs one dict lookup per field.
    """

    __slots__ = ("by_name", "cache")

    def __init__(self, identity: Sequence[str] = DEFAULT_CLIENT_IDENTITY_HEADERS) -> None:
        self.by_name = dict(_CLASS_BY_NAME)
        for name in identity:
            self.by_name.setdefault(name.lower().encode("latin-1"), IDENTITY)
        self.cache: dict[bytes, int] = {}

    def classify(self, name: bytes) -> int:
        kind = self.by_name.get(name.lower(), KEEP)
        if len(self.cache) < _CACHE_LIMIT:
            self.cache[name] = kind
        return kind


DEFAULT_CLASSES = HeaderClasses()


def header_class(name: bytes) -> int:
    """The class of a field name, case-insensitively (default identity fields)."""
    kind = DEFAULT_CLASSES.cache.get(name)
    return DEFAULT_CLASSES.classify(name) if kind is None else kind


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Lower-cased field names listed in a `Connection` value."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def _drop_named(lines: list[bytes], named: frozenset[bytes]) -> list[bytes]:
    """Remove the fields a `Connection` header named from serialized lines (rare path)."""
    kept: list[bytes] = []
    for i in range(0, len(lines), 4):
        if lines[i].lower() not in named:
            kept += lines[i : i + 4]
    return kept


class TrustedProxies:
    """CIDR set deciding whose forwarding headers are believed."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, cidrs: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._cache: dict[str, bool] = {}

    def __contains__(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is None:
            if not self._networks:
                return False
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                return False
            hit = any(address in net for net in self._networks)
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[ip] = hit
        return hit


class RequestFields:
    """One scan of a request head: what routing needs plus the fields to forward."""

    __slots__ = (
        "accepts_html",
        "chunked",
        "content_length",
        "expect",
        "forwarded_host",
        "forwarded_proto",
        "host",
        "host_count",
        "idempotency_key",
        "lines",
        "request_id",
        "transfer_encoding",
        "upgrade",
        "xff",
    )

    def __init__(
        self,
        headers: Sequence[Header],
        trusted: bool,
        classes: HeaderClasses = DEFAULT_CLASSES,
    ) -> None:
        lines: list[bytes] = []
        self.host: bytes | None = None
        self.host_count = 0
        self.content_length: bytes | None = None
        self.transfer_encoding: bytes | None = None
        self.chunked = False
        self.expect: bytes | None = None
        self.upgrade = b""
        self.request_id = b""
        self.xff = b""
        self.forwarded_proto = False
        self.forwarded_host = False
        self.idempotency_key = b""
        self.accepts_html = False
        named: frozenset[bytes] = frozenset()
        cache = classes.cache
        for name, value in headers:
            kind = cache.get(name)
            if kind is None:
                kind = classes.classify(name)
            if kind == KEEP:
                lines += (name, b": ", value, b"\r\n")
            elif kind == HOST:
                self.host = value
                self.host_count += 1
            elif kind == CONTENT_LENGTH:
                self.content_length = value
            elif kind == TRANSFER_ENCODING:
                # Several fields form one list (RFC 9110 §5.3): chunked must be the only coding.
                if self.transfer_encoding is not None:
                    value = self.transfer_encoding + b", " + value
                self.transfer_encoding = value
                self.chunked = value.strip().lower() == b"chunked"
            elif kind == CONNECTION:
                if value.lower() not in _PLAIN_CONNECTION_TOKENS:
                    named = named | (connection_tokens(value) - _PLAIN_CONNECTION_TOKENS)
            elif kind == REQUEST_ID:
                # Anyone else's id could collide with, or impersonate, the edge's own.
                if trusted and 0 < len(value) <= 200:
                    self.request_id = value
            elif kind == XFF:
                if trusted:
                    self.xff = self.xff + b", " + value if self.xff else value
            elif kind == FORWARDING:
                if trusted:
                    lines += (name, b": ", value, b"\r\n")
                    lower = name.lower()
                    if lower == b"x-forwarded-proto":
                        self.forwarded_proto = True
                    elif lower == b"x-forwarded-host":
                        self.forwarded_host = True
            elif kind == EXPECT:
                self.expect = value
            elif kind == UPGRADE:
                self.upgrade = value
            elif kind == IDEMPOTENCY_KEY:
                self.idempotency_key = value
                lines += (name, b": ", value, b"\r\n")
            elif kind == ACCEPT:
                self.accepts_html = b"text/html" in value
                lines += (name, b": ", value, b"\r\n")
            elif kind == IDENTITY and trusted:
                lines += (name, b": ", value, b"\r\n")
        self.lines = _drop_named(lines, named) if named else lines


def build_request_head(
    method: bytes,
    target: bytes,
    fields: RequestFields,
    *,
    host: bytes,
    client_ip: bytes,
    scheme: bytes,
    request_id: bytes,
    body: bytes,
    upgrade: bool = False,
) -> bytes:
    """Serialize the upstream request head.

    `body` is the framing line to add: b"" (no body), b"Content-Length: N" or
    b"Transfer-Encoding: chunked". `upgrade` keeps Upgrade/Connection for tunnels.
    """
    xff = fields.xff + b", " + client_ip if fields.xff else client_ip
    out = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n", *fields.lines]
    out += (b"X-Forwarded-For: ", xff, b"\r\n")
    if not fields.forwarded_proto:
        out += (b"X-Forwarded-Proto: ", scheme, b"\r\n")
    if not fields.forwarded_host:
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    out += (b"X-Request-Id: ", request_id, b"\r\n")
    if upgrade:
        out += (b"Connection: upgrade\r\nUpgrade: ", fields.upgrade, b"\r\n")
    if body:
        out += (body, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


# How a response body reaches the client.
BODY_NONE = 0  # HEAD, 204, 304, 101
BODY_LENGTH = 1  # upstream's Content-Length passes through
BODY_CHUNKED = 2  # re-chunked for an HTTP/1.1 client
BODY_EOF = 3  # HTTP/1.0 client without length: ends when the edge closes
BODY_RECHUNKED_EOF = 4  # upstream body ends at its close; chunked to the client


def build_response_head(
    status: int,
    reason: bytes,
    headers: Sequence[Header],
    *,
    head_request: bool,
    keep_alive: bool,
    http10_client: bool,
    upgrade: bool = False,
) -> tuple[bytes, int]:
    """Serialize the client response head and say how its body is framed."""
    out = [b"HTTP/1.1 ", b"%d" % status, b" ", reason or _REASONS.get(status, b""), b"\r\n"]
    start = len(out)
    length: bytes | None = None
    upgrade_value = b""
    upstream_chunked = False
    named: frozenset[bytes] = frozenset()
    cache = DEFAULT_CLASSES.cache
    for name, value in headers:
        kind = cache.get(name)
        if kind is None:
            kind = DEFAULT_CLASSES.classify(name)
        if _KEPT_IN_RESPONSE[kind]:
            out += (name, b": ", value, b"\r\n")
        elif kind == CONTENT_LENGTH:
            length = value
        elif kind == TRANSFER_ENCODING:
            upstream_chunked = True
        elif kind == CONNECTION:
            if value.lower() not in _PLAIN_CONNECTION_TOKENS:
                named = named | (connection_tokens(value) - _PLAIN_CONNECTION_TOKENS)
        elif kind == UPGRADE:
            upgrade_value = value
    if named:
        out[start:] = _drop_named(out[start:], named)

    if upgrade:
        mode = BODY_NONE
        out += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    else:
        if status == 204 or status == 304:
            mode = BODY_NONE
        elif length is not None:
            mode = BODY_NONE if head_request else BODY_LENGTH
            out += (b"Content-Length: ", length, b"\r\n")
        elif head_request:
            mode = BODY_NONE
        elif http10_client:
            mode = BODY_EOF
            keep_alive = False
        else:
            mode = BODY_CHUNKED if upstream_chunked else BODY_RECHUNKED_EOF
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        elif http10_client:
            out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), mode


def starting_page(app: str, retry_after: float) -> bytes:
    """A small self-refreshing page for a browser whose app is still waking."""
    body = (
        "<!doctype html><html><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{max(1, round(retry_after))}">'
        f"<title>Starting {app}</title></head><body><p>{app} is starting up; this page "
        "reloads by itself.</p></body></html>\n"
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {max(1, round(retry_after))}\r\n"
        "Cache-Control: no-store\r\nX-Edge-Error: starting_page\r\n\r\n"
    ).encode()
    return head + body


def queued_response(app: str, queued_id: str, duplicate: bool, *, close: bool) -> bytes:
    """202 for a request the durable queue acknowledged (or already had, for a duplicate)."""
    body = (
        f'{{"queued_id": "{queued_id}", "app": "{app}", '
        f'"duplicate": {"true" if duplicate else "false"}}}\n'
    ).encode()
    lines = [
        "HTTP/1.1 202 Accepted",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"X-Edge-Queued-Id: {queued_id}",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_response(
    status: int,
    reason_text: str,
    *,
    close: bool,
    kind: str = "",
    head: bool = False,
    retry_after: float = 1.0,
) -> bytes:
    """A complete short plain-text response the edge answers on its own."""
    body = f"edge: {reason_text}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, b'').decode()}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
    ]
    if kind:
        lines.append(f"X-Edge-Error: {kind}")
    if status == 503:
        lines.append(f"Retry-After: {max(1, round(retry_after))}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


def server_timing(waited_ms: float, phases: WakePhases | None) -> bytes:
    """The Server-Timing field of a request held for a wake: its own wait, then the phases
    of the wake that released it (when known), in ms."""
    field = b"Server-Timing: wake;dur=%.1f" % waited_ms
    if phases is not None:
        field += b", budget;dur=%.1f, allocation;dur=%.1f, readiness;dur=%.1f" % (
            phases.budget_ms,
            phases.allocation_ms,
            phases.readiness_ms,
        )
    return field + b"\r\n"
