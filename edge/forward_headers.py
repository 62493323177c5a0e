"""Header rewriting for forwarding, both directions: plain functions on byte pairs, no I/O.

Hop-by-hop fields (RFC 9110 §7.6.1) and every field named in `Connection` are
dropped; framing is decided by the edge, never copied. Client-supplied
forwarding fields survive only from trusted proxies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from http import HTTPStatus

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Framing and routing fields the edge always writes itself.
_REQUEST_OWNED = frozenset({b"host", b"content-length", b"expect"})
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
_RESPONSE_OWNED = frozenset({b"content-length"})

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Lower-cased field names listed in every `Connection` header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


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
            if len(self._cache) < 4096:
                self._cache[ip] = hit
        return hit


def build_request_head(
    method: bytes,
    target: bytes,
    headers: Sequence[Header],
    *,
    host: bytes,
    client_ip: str,
    scheme: bytes,
    trusted: bool,
    request_id: bytes,
    body: bytes,
    upgrade: bool = False,
) -> bytes:
    """Serialize the upstream request head.

    `body` is the framing line to add: b"" (no body), b"Content-Length: N" or
    b"Transfer-Encoding: chunked". `upgrade` keeps Upgrade/Connection for tunnels.
    """
    named = connection_tokens(headers)
    out = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    prior_xff = b""
    upgrade_value = b""
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in _REQUEST_OWNED or lower in named:
            if upgrade and lower == b"upgrade":
                upgrade_value = value
            continue
        if lower in _FORWARDING:
            if not trusted:
                continue
            if lower == b"x-forwarded-for":
                prior_xff = prior_xff + b", " + value if prior_xff else value
                continue
        elif lower == b"x-request-id":
            continue
        out += (name, b": ", value, b"\r\n")
    client = client_ip.encode()
    out += (b"X-Forwarded-For: ", prior_xff + b", " + client if prior_xff else client, b"\r\n")
    if not trusted or not _has(headers, b"x-forwarded-proto"):
        out += (b"X-Forwarded-Proto: ", scheme, b"\r\n")
    if not trusted or not _has(headers, b"x-forwarded-host"):
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    out += (b"X-Request-Id: ", request_id, b"\r\n")
    if upgrade:
        out += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    if body:
        out += (body, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _has(headers: Sequence[Header], lower_name: bytes) -> bool:
    return any(name.lower() == lower_name for name, _ in headers)


def build_response_head(
    status: int,
    reason: bytes,
    headers: Sequence[Header],
    *,
    framing: bytes,
    keep_alive: bool,
    http10_client: bool,
    upgrade: bool = False,
) -> bytes:
    """Serialize the client response head; `framing` as in `build_request_head`."""
    named = connection_tokens(headers)
    out = [b"HTTP/1.1 ", str(status).encode(), b" ", reason or _REASONS.get(status, b""), b"\r\n"]
    upgrade_value = b""
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in _RESPONSE_OWNED or lower in named:
            if upgrade and lower == b"upgrade":
                upgrade_value = value
            continue
        out += (name, b": ", value, b"\r\n")
    if framing:
        out += (framing, b"\r\n")
    if upgrade:
        out += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    elif not keep_alive:
        out.append(b"Connection: close\r\n")
    elif http10_client:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def error_response(status: int, reason_text: str, *, close: bool, kind: str = "") -> bytes:
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
        lines.append("Retry-After: 1")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
