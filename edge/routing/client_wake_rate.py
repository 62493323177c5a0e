"""Per-client wake allowance: a client can start so many wakes, then must wait. Plain data.

Every request for a cold app can start a wake, including requests that are refused
(rejected, over the hold caps): without a limit, anyone can spend the region's whole
wake budget by asking for many cold hosts. Each client (its address, or the address a
trusted proxy forwarded) has a token bucket; starting a wake costs one token; a
request that would start a wake with none left is refused (429) and starts nothing.
Requests for an app already waking in this process coalesce and cost nothing. The
buckets are per worker, so the region-wide allowance is about `workers x edges` times
the configured one.
"""

from __future__ import annotations

import msgspec

# At most this many clients are tracked; past it, buckets that have refilled go first.
MAX_CLIENTS = 65536


class ClientWakeRate(msgspec.Struct, frozen=True):
    """`burst` wakes at once, refilled at `per_second`; `per_second = 0` turns it off."""

    per_second: float = 1.0
    burst: float = 20.0


def client_key(peer: str, trusted: bool, forwarded_for: bytes) -> str:
    """Who is asking: the peer, or, behind a trusted proxy, the address it forwarded
    (the last X-Forwarded-For entry, the one the proxy itself added)."""
    if trusted and forwarded_for:
        return forwarded_for.rsplit(b",", 1)[-1].strip().decode("latin-1") or peer
    return peer


class ClientWakeAllowance:
    """Token buckets of the clients that started wakes recently."""

    __slots__ = ("_buckets", "rate")

    def __init__(self, rate: ClientWakeRate) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str, now: float) -> float:
        """Charge one wake to `client`: 0.0 when allowed, else seconds until one is."""
        rate = self.rate
        if rate.per_second <= 0:
            return 0.0
        tokens, at = self._buckets.get(client, (rate.burst, now))
        tokens = min(rate.burst, tokens + (now - at) * rate.per_second)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / rate.per_second
        if client not in self._buckets and len(self._buckets) >= MAX_CLIENTS:
            self.forget_full(now)
        self._buckets[client] = (tokens - 1.0, now)
        return 0.0

    def forget_full(self, now: float) -> None:
        """Drop the clients whose buckets have refilled (they are as if never seen)."""
        rate = self.rate
        full = [
            client
            for client, (tokens, at) in self._buckets.items()
            if rate.per_second <= 0 or tokens + (now - at) * rate.per_second >= rate.burst
        ]
        for client in full:
            del self._buckets[client]
        if len(self._buckets) >= MAX_CLIENTS:  # all busy: drop the oldest half
            oldest = sorted(self._buckets, key=lambda c: self._buckets[c][1])
            for client in oldest[: len(oldest) // 2]:
                del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)
