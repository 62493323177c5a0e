"""Delivering one queued request to the app over the edge's one HTTP/1.1 upstream client."""

from __future__ import annotations

from collections.abc import Callable

from edge.upstream.client import MalformedResponse, UpstreamClient, UpstreamFailed, Withheld
from scheduler_client.config_file import parse_address


class DeliveryFailed(Exception):
    """No usable answer: timed out or the connection failed (retried), or, when `final`,
    the app's bytes were not an HTTP response (dead-lettered at once)."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class NotSent(Exception):
    """`may_send` said no before the request's last byte: the app holds no whole request,
    so it cannot have acted on this attempt."""


class ReplayConnection:
    """A kept-alive connection to one app address, reopened when it breaks."""

    def __init__(self) -> None:
        # Response bodies are read and dropped; only the status matters.
        self._client = UpstreamClient(keep_body=0)

    async def deliver(
        self,
        address: str,
        method: str,
        head: bytes,
        body: bytes,
        extra: bytes,
        timeout: float,
        may_send: Callable[[], bool] | None = None,
    ) -> int:
        """Send `head` (ending in a blank line) with `extra` header lines and `body`;
        the final status the app answered (101 included). Raises DeliveryFailed, or
        NotSent when `may_send` (asked right before each write) refused."""
        host, port = parse_address(address)
        request = head[:-2] + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
        try:
            response = await self._client.request(
                host,
                port,
                request,
                head_only=method == "HEAD",
                timeout=timeout,
                may_send=may_send,
            )
        except Withheld as exc:
            raise NotSent("not sent: refused before the request's last byte") from exc
        except MalformedResponse as exc:
            # The same bytes would come back on every attempt: the app's answer is broken.
            raise DeliveryFailed(str(exc), final=True) from exc
        except UpstreamFailed as exc:
            raise DeliveryFailed(str(exc)) from exc
        # A 101 (the connection is closed: no tunnel here) is returned like any status;
        # what it means for the entry is replay_policy's decision.
        return response.status

    def close(self) -> None:
        self._client.close()
