"""Sans-I/O rules of durable replay: dedupe keys, what a response means, back-off."""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable

from scheduler_client import backoff

IDEMPOTENCY_KEY = b"idempotency-key"
# Longer header values are hashed, so a hostile sender cannot make huge Redis keys.
MAX_KEY_TEXT = 200


class Outcome(enum.Enum):
    DONE = "delivered"
    DEAD = "dead_lettered"
    RETRY = "retried"


def header_key(source: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """The dedupe key a header gives, per the policy's `dedupe_key`; None: hash the body."""
    wanted: list[bytes] = []
    if source.startswith("header:"):
        wanted.append(source[7:].lower().encode())
    if source != "hash":
        wanted.append(IDEMPOTENCY_KEY)
    for name in wanted:
        for header, value in headers:
            if header.lower() == name and value.strip():
                text = value.strip()
                if len(text) > MAX_KEY_TEXT or not text.isascii():
                    return "hk:" + hashlib.sha256(name + b"\0" + text).hexdigest()
                return "h:" + name.decode() + ":" + text.decode()
    return None


# Who sent a request: part of every hashed key, so two senders of one body stay apart.
AUTHORIZATION = b"authorization"
# The policy's `identity_headers` when it names none.
DEFAULT_IDENTITY_HEADERS = ("Cookie", "X-Api-Key")


def identity_of(head: bytes, identity_headers: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """The Host, Authorization and `identity_headers` lines of a request head (as the app
    would get it), names lowercased, in the order they appear."""
    wanted = {AUTHORIZATION, b"host", *(name.lower().encode() for name in identity_headers)}
    found = []
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in wanted:
            found.append((name.strip().lower(), value.strip()))
    return found


def body_key(
    method: bytes,
    path: bytes,
    body: bytes,
    head: bytes = b"",
    identity_headers: Iterable[str] = DEFAULT_IDENTITY_HEADERS,
) -> str:
    """The dedupe key of a request without a key header: a hash of method, path (with its
    query), body, and from `head` the Host, Authorization and `identity_headers` values."""
    digest = hashlib.sha256()
    for part in (method, path, body):
        digest.update(b"%d:%b" % (len(part), part))  # length-prefixed: no two splits collide
    for name, value in identity_of(head, identity_headers):
        digest.update(b"%d:%b%d:%b" % (len(name), name, len(value), value))
    return "x:" + digest.hexdigest()


# "Try again later" answers, retried like 5xx rather than dead-lettered like other 4xx.
RETRYABLE_4XX = frozenset({408, 425, 429})


def outcome_of(
    status: int | None, attempts: int, max_attempts: int, final: bool = False
) -> Outcome:
    """2xx is done; other answers below 500 are final (dead letter), 101 and any other
    1xx taken as the answer included, and so is a `final` failure (bytes that are not
    HTTP); 5xx, 408/425/429, timeouts and connection errors (None) are retried until
    `attempts` (this one included) reaches `max_attempts`."""
    if status is not None and 200 <= status < 300:
        return Outcome.DONE
    if final or (status is not None and status < 500 and status not in RETRYABLE_4XX):
        return Outcome.DEAD
    return Outcome.RETRY if attempts < max_attempts else Outcome.DEAD


def dead_reason(
    status: int | None, error: str, attempts: int, max_attempts: int, final: bool = False
) -> str:
    """Why an entry is dead-lettered, as the dead letter records it (`error` describes a
    failure without a status)."""
    if status == 101:
        why = "status 101: the app switched protocols; a queued request needs a final answer"
    elif status is not None and status < 200:
        why = f"status {status}: an informational answer as the final one"
    elif status is not None:
        why = f"status {status}"
    else:
        why = error
    if final:
        return f"{why} (not an HTTP response: not retried)"
    if attempts >= max_attempts and (status is None or status >= 500 or status in RETRYABLE_4XX):
        return f"{attempts} attempts: {why}"
    return why


def retry_delay(attempts: int, initial: float, ceiling: float) -> float:
    """Exponential back-off after `attempts` failed deliveries: initial, 2x, 4x ... ceiling.

    No jitter: the delay schedules the entry's next claim, it does not race other clients."""
    return backoff.delay(max(0, attempts - 1), initial, ceiling)


class LeaseTerm:
    """Until when a replayer may act on its lease by its own clock: a margin before the
    store would let it lapse (the term counts from when the grant or renewal was asked,
    never from its answer: the store's clock started no earlier), so a holder frozen past
    its lease never sends on it after it thaws. A refused renewal ends the term for good:
    the store gave the lease to another holder."""

    __slots__ = ("margin", "ttl", "until")

    def __init__(self, ttl: float, asked_at: float, margin: float = 0.2) -> None:
        self.ttl = ttl
        self.margin = margin
        self.until = asked_at + ttl * (1.0 - margin)

    def renewed(self, asked_at: float) -> None:
        # max: a late answer to an older renewal never shortens the term. An ended term
        # stays ended: once the store refused us, only a new grant (a new term) is ours.
        if self.until != -math.inf:
            self.until = max(self.until, asked_at + self.ttl * (1.0 - self.margin))

    def end(self) -> None:
        self.until = -math.inf

    def valid(self, now: float) -> bool:
        return now < self.until
