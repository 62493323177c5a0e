"""WebSocket close frames the edge sends itself when a tunnel's allocation drains."""

from __future__ import annotations

import os

GOING_AWAY = b"\x03\xe9"  # status 1001


def going_away_frames(mask: bytes | None = None) -> tuple[bytes, bytes]:
    """(to the client: unmasked close 1001, to the upstream: the same close, masked)."""
    mask = mask if mask is not None else os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(GOING_AWAY))
    return b"\x88\x02" + GOING_AWAY, b"\x88\x82" + mask + masked
