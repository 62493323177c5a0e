"""Request classes for apps that are not hot: hold, reject or queue. Plain data, no I/O.

Rules are tried in order (the app's, then the config-wide defaults); the first
match decides. Without a match: GET, HEAD and OPTIONS are held, so is anything
carrying a non-empty `Idempotency-Key`; everything else is rejected, because a request
that is not safe to repeat must never wait in memory where a crash loses it.
A hot app is proxied whatever the class.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Literal

import msgspec

RequestClass = Literal["hold", "reject", "queue"]
_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


class RequestFacts(msgspec.Struct, frozen=True):
    """What rules look at, gathered once per request that needs classifying."""

    method: bytes
    path: bytes  # without the query string
    host: str
    headers: dict[bytes, bytes]  # lower-cased names, first value
    content_type: bytes = b""  # media type only, lower-cased


class Rule(msgspec.Struct, frozen=True):
    request_class: RequestClass
    methods: frozenset[bytes] | None = None
    path_exact: bytes | None = None
    path_prefix: bytes | None = None
    path_glob: re.Pattern[bytes] | None = None
    host: str | None = None
    header: bytes | None = None
    header_value: bytes | None = None
    content_type: bytes | None = None

    def matches(self, facts: RequestFacts) -> bool:
        if self.methods is not None and facts.method not in self.methods:
            return False
        if self.path_exact is not None and facts.path != self.path_exact:
            return False
        if self.path_prefix is not None and not facts.path.startswith(self.path_prefix):
            return False
        if self.path_glob is not None and not self.path_glob.fullmatch(facts.path):
            return False
        if self.host is not None and facts.host != self.host:
            return False
        if self.header is not None:
            value = facts.headers.get(self.header)
            if value is None or (self.header_value is not None and value != self.header_value):
                return False
        return self.content_type is None or facts.content_type == self.content_type


def make_rule(
    request_class: RequestClass,
    *,
    methods: Sequence[str] = (),
    path: str = "",
    path_prefix: str = "",
    path_glob: str = "",
    host: str = "",
    header: str = "",
    header_value: str | None = None,
    content_type: str = "",
) -> Rule:
    """A rule from config values; empty means "any"."""
    return Rule(
        request_class=request_class,
        methods=frozenset(m.upper().encode() for m in methods) or None,
        path_exact=path.encode() if path else None,
        path_prefix=path_prefix.encode() if path_prefix else None,
        path_glob=re.compile(fnmatch.translate(path_glob).encode()) if path_glob else None,
        host=host.lower() or None,
        header=header.lower().encode() or None,
        header_value=header_value.encode() if header_value is not None else None,
        content_type=content_type.lower().encode() or None,
    )


def default_class(facts: RequestFacts) -> RequestClass:
    """Safe methods, and requests with a non-empty `Idempotency-Key`, are held."""
    if facts.method in _SAFE_METHODS or facts.headers.get(b"idempotency-key", b"").strip():
        return "hold"
    return "reject"


def classify(rules: Sequence[Rule], facts: RequestFacts) -> RequestClass:
    """The first matching rule's class, else the default."""
    for rule in rules:
        if rule.matches(facts):
            return rule.request_class
    return default_class(facts)


def facts_from(
    method: bytes, target: bytes, host: str, headers: Sequence[tuple[bytes, bytes]]
) -> RequestFacts:
    """Facts of a parsed request; repeated fields keep their first value."""
    lowered: dict[bytes, bytes] = {}
    for name, value in headers:
        lowered.setdefault(name.lower(), value)
    media = lowered.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return RequestFacts(
        method=method,
        path=target.split(b"?", 1)[0],
        host=host,
        headers=lowered,
        content_type=media,
    )
