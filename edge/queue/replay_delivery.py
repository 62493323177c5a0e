"""Delivering one queued request to the app over the edge's one HTTP/1.1 upstream client."""

from __future__ import annotations

from edge.upstream.client import UpstreamClient, UpstreamFailed
from scheduler_client.config_file import parse_address


class DeliveryFailed(Exception):
    """Timed out, or the connection failed before a whole response arrived."""


class SwitchedProtocols(Exception):
    """The app answered 101. Not a DeliveryFailed: the replayer pauses the app and sends
    the entry again on its next scan, as before the shared client (issue 12 decides)."""


class ReplayConnection:
    """A kept-alive connection to one app address, reopened when it breaks."""

    def __init__(self) -> None:
        # Response bodies are read and dropped; only the status matters.
        self._client = UpstreamClient(keep_body=0)

    async def deliver(
        self, address: str, method: str, head: bytes, body: bytes, extra: bytes, timeout: float
    ) -> int:
        """Send `head` (ending in a blank line) with `extra` header lines and `body`;
        the response status. Raises DeliveryFailed."""
        host, port = parse_address(address)
        request = head[:-2] + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
        try:
            response = await self._client.request(
                host, port, request, head_only=method == "HEAD", timeout=timeout
            )
        except UpstreamFailed as exc:
            raise DeliveryFailed(str(exc)) from exc
        if response.upgraded:
            raise SwitchedProtocols(f"{response.status} {response.reason.decode(errors='replace')}")
        return response.status

    def close(self) -> None:
        self._client.close()
