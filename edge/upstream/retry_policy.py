"""When a request whose upstream failed may be sent again. Plain functions, no I/O.

Only idempotent requests with no body (so nothing was consumed that cannot be
sent again) are retried, and never after any byte of the response came back.
"""

from __future__ import annotations

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def replayable(method: bytes, body_done: bool, body_seen: int) -> bool:
    """An idempotent request whose (empty) body is complete can be sent again as it was."""
    return method in IDEMPOTENT and body_done and body_seen == 0


def retry_on_stale_connection(
    method: bytes, body_done: bool, body_seen: int, reused: bool, got_bytes: bool
) -> bool:
    """A pooled connection the upstream had already closed: safe to try once more."""
    return reused and not got_bytes and replayable(method, body_done, body_seen)


def retry_elsewhere(method: bytes, body_done: bool, body_seen: int, retried: bool) -> bool:
    """Once per request: move to another ready allocation of the app."""
    return not retried and replayable(method, body_done, body_seen)
