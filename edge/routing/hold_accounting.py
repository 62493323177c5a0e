"""Hold accounting: requests held (or being queued) and their reserved body bytes, per app
and per worker, against their caps. Plain data, no I/O.

A reservation is made when a request for a cold app is admitted, grows as its body
arrives, and is given back exactly once, on whichever ending the request has (answered,
refused, client gone).
"""

from __future__ import annotations

import msgspec


class HoldCaps(msgspec.Struct, frozen=True):
    """At most `max_held` requests and `max_held_body_bytes` reserved body bytes."""

    max_held: int
    max_held_body_bytes: int


class HoldAccounting:
    """Counts and reserved bytes of held requests, per app and in all."""

    __slots__ = ("by_app", "bytes", "bytes_by_app", "caps", "total")

    def __init__(self, caps: HoldCaps) -> None:
        self.caps = caps  # the worker's caps; replaced on reload, counts kept
        self.total = 0
        self.bytes = 0
        self.by_app: dict[str, int] = {}
        self.bytes_by_app: dict[str, int] = {}

    def fits(self, app: str, app_caps: HoldCaps, reserve: int) -> bool:
        """Whether one more request reserving `reserve` bytes stays within every cap."""
        return (
            self.by_app.get(app, 0) < app_caps.max_held
            and self.total < self.caps.max_held
            and self.bytes_by_app.get(app, 0) + reserve <= app_caps.max_held_body_bytes
            and self.bytes + reserve <= self.caps.max_held_body_bytes
        )

    def reserve(self, app: str, reserve: int) -> None:
        """Count one held request of `app` with `reserve` body bytes."""
        self.by_app[app] = self.by_app.get(app, 0) + 1
        self.bytes_by_app[app] = self.bytes_by_app.get(app, 0) + reserve
        self.total += 1
        self.bytes += reserve

    def grow(self, app: str, app_caps: HoldCaps, more: int) -> bool:
        """Count `more` body bytes of a held request of `app` as they arrive; False (nothing
        counted) when they do not fit the caps."""
        app_bytes = self.bytes_by_app.get(app, 0) + more
        if (
            app_bytes > app_caps.max_held_body_bytes
            or self.bytes + more > self.caps.max_held_body_bytes
        ):
            return False
        self.bytes_by_app[app] = app_bytes
        self.bytes += more
        return True

    def release(self, app: str, reserve: int) -> None:
        """Give back what `reserve` counted; an app's entries go once they reach zero."""
        held = self.by_app.get(app, 0) - 1
        held_bytes = self.bytes_by_app.get(app, 0) - reserve
        if held > 0:
            self.by_app[app] = held
            self.bytes_by_app[app] = held_bytes
        else:
            self.by_app.pop(app, None)
            self.bytes_by_app.pop(app, None)
        self.total -= 1
        self.bytes -= reserve

    def held(self, app: str) -> int:
        return self.by_app.get(app, 0)
