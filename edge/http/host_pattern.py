"""Host names and patterns: normalisation and exact-then-wildcard matching, no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


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


def host_from_header(value: bytes | str) -> str | None:
    """'Shop.Example.com:8080' -> 'shop.example.com'; None when malformed."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
    else:
        host, _, port = value.partition(":")
        rest = ":" + port if _ else ""
    if rest and (rest[0] != ":" or not rest[1:].isdigit()):
        return None
    host = host.rstrip(".")
    if not host or host[0] == "." or ".." in host or any(c in host for c in "/@ \t?#\\"):
        return None
    return host


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
