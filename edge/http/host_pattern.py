"""Host names and patterns: normalisation and exact-then-wildcard matching, no I/O."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

# RFC 1123 labels: letters, digits and inner hyphens, at most 63 characters.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_NAME = 253


class HostPatternError(ValueError):
    """A host or pattern that is not a valid DNS name or '*.' wildcard."""


def normalize_host_pattern(pattern: str) -> str:
    """Lower-case and validate 'app.example.com' or '*.example.com'."""
    host = pattern.strip().lower().rstrip(".")
    labels = host.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
        if not labels:
            raise HostPatternError(f"{pattern!r}: a wildcard needs a domain, e.g. '*.example.com'")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise HostPatternError(
            f"{pattern!r}: expected a host name like 'app.example.com' or '*.example.com'"
        )
    return host


def parse_host_header(value: bytes | str) -> tuple[str, str] | None:
    """'Shop.Example.com.:8080' -> ('shop.example.com', '8080'); None unless the value is a
    DNS name (RFC 1123 labels) or an IP literal, with an optional port."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[: end + 1], value[end + 1 :]
        if end < 0 or not _ipv6_literal(host[1:-1]):
            return None
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
        if host.endswith("."):
            host = host[:-1]  # the absolute form of the same name
        if len(host) > MAX_NAME or not all(_LABEL.fullmatch(label) for label in host.split(".")):
            return None
    port = ""
    if rest:
        port = rest[1:]
        if rest[0] != ":" or not _PORT.fullmatch(port) or int(port) > 65535:
            return None
    return host, port


def _ipv6_literal(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def host_from_header(value: bytes | str) -> str | None:
    """'Shop.Example.com:8080' -> 'shop.example.com'; None when malformed."""
    parsed = parse_host_header(value)
    return parsed[0] if parsed is not None else None


def normalize_host_header(value: bytes | str) -> bytes | None:
    """The Host value to route by and forward: 'Shop.Example.com.:8080' ->
    b'shop.example.com:8080'; None when malformed."""
    parsed = parse_host_header(value)
    return None if parsed is None else host_bytes(*parsed)


def host_bytes(host: str, port: str) -> bytes:
    """('shop.example.com', '8080') -> b'shop.example.com:8080'."""
    return (f"{host}:{port}" if port else host).encode("ascii")


class HostTable(Generic[T]):
    """Exact names first, then the longest matching '*.suffix' pattern."""

    __slots__ = ("_exact", "_wildcards")

    def __init__(self, entries: Mapping[str, T]) -> None:
        self._exact: dict[str, T] = {}
        self._wildcards: dict[str, T] = {}
        for pattern, value in entries.items():
            host = normalize_host_pattern(pattern)
            if host.startswith("*."):
                self._wildcards[host[1:]] = value  # keep the leading dot
            else:
                self._exact[host] = value

    def lookup(self, host: str) -> T | None:
        value = self._exact.get(host)
        if value is not None or not self._wildcards:
            return value
        # '*.example.com' matches 'a.example.com' and 'a.b.example.com', not 'example.com'.
        dot = host.find(".")
        while dot >= 0:
            value = self._wildcards.get(host[dot:])
            if value is not None:
                return value
            dot = host.find(".", dot + 1)
        return None
