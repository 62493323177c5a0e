"""The async control-plane client: typed calls, timeouts, retries with jitter, a breaker.

Theory of operation. Every method is one `_call`: a bounded loop of attempts.

- Each attempt asks the circuit breaker first; an open breaker fails the call at
  once with `Unavailable("circuit open ...")` and touches no socket.
- Each attempt has its own timeout (`timeout`, or poll timeout + `timeout` for
  long-polls), and the whole call has a budget of
  ``attempt_timeout * (retries + 1) + longest possible backoff``; no attempt and
  no sleep runs past it, so no call outlives its budget whatever the server does.
- Only calls that are safe to repeat are retried: GET and PUT, the POSTs that are
  idempotent by meaning (drain, stop, cordon, uncordon, edge registration, acks,
  approvals) and an allocation create that carries an idempotency key. A route
  CAS, a promotion create, or a keyless allocation create is sent once: after a
  lost answer nobody knows whether the server acted.
- Retried: connection errors, timeouts, 502/503/504. Never 4xx (the server
  answered and meant it). Between attempts: full-jitter exponential backoff,
  stretched to the server's Retry-After when it sends one.
- The breaker counts transport failures and 5xx answers as failures; any other
  answer (4xx included) shows the server alive and counts as a success. So does
  a 5xx carrying the protocol's own error body with a code other than
  "internal" (a 503 "region disabled", say): the control plane answered on
  purpose, and counting it would let refused allocations shut out every call.
- Errors are typed: the server's ``{"error": code, "message": ...}`` maps to the
  classes in `models` by code, falling back to the HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
import yarl

from scheduler_client.backoff import Backoff
from scheduler_client.circuit_breaker import CircuitBreaker
from scheduler_client.models import (
    ERRORS_BY_CODE,
    ERRORS_BY_STATUS,
    Allocation,
    AppRoute,
    BadRequest,
    ControlPlaneError,
    CreateAllocation,
    CreatePromotion,
    DrainRequest,
    EdgeAck,
    EdgeInfo,
    EdgeRegistration,
    ErrorBody,
    Host,
    HostDrainRequest,
    MachinesReport,
    Promotion,
    Region,
    RouteCas,
    RouteChanges,
    RouteSnapshot,
    SetRegion,
    TooLarge,
    Unavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({502, 503, 504})
# A route snapshot for thousands of apps is big, but never this big.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
_ERROR_BODY_BYTES = 64 * 1024
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


# List endpoints wrap their items; these structs are lenient on purpose.
class _Allocations(msgspec.Struct):
    allocations: list[Allocation]


class _Hosts(msgspec.Struct):
    hosts: list[Host]


class _Edges(msgspec.Struct):
    edges: list[EdgeInfo]


_encoder = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(ErrorBody)


def _segment(value: str, what: str) -> str:
    """One path segment, percent-encoded; an empty one would address another resource."""
    if not value:
        raise BadRequest(f"{what} must not be empty")
    return quote(value, safe="")


def _seconds(value: float) -> str:
    return format(value, "g")


def _error_from(status: int, body: bytes, where: str) -> ControlPlaneError:
    """The typed error for a non-2xx answer: by the body's code, else by status."""
    try:
        parsed: ErrorBody | None = _error_decoder.decode(body)
    except msgspec.MsgspecError:
        parsed = None
    if parsed is not None:
        cls = ERRORS_BY_CODE.get(parsed.error)
        message = parsed.message
        reason_code = parsed.reason_code
    else:
        cls = None
        message = body[:200].decode("utf-8", "replace").strip() or "(no body)"
        reason_code = ""
    if cls is None:
        cls = ERRORS_BY_STATUS.get(status)
    if cls is None:
        if status in RETRY_STATUSES:
            cls = Unavailable
        elif 400 <= status < 500:
            cls = BadRequest
        else:
            cls = ControlPlaneError
    return cls(f"{where}: {status} {message}", reason_code)


def _deliberate_refusal(body: bytes) -> bool:
    """True for a 5xx the control plane itself chose to send (e.g. region disabled).

    Such an answer proves the control plane is up and deciding, so it must not trip
    the breaker: refusals of allocations would otherwise shut out every other call.
    A bare 5xx (a proxy in front, a crash) or the protocol's "internal" code still counts.
    """
    try:
        parsed = _error_decoder.decode(body)
    except msgspec.MsgspecError:
        return False
    return parsed.error != "internal"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (the delta form; the date form is not worth parsing here)."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ControlPlaneClient:
    """Typed async client of the control-plane HTTP API; one aiohttp session per client."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff_base: float = 0.1,
        backoff_cap: float = 2.0,
        breaker_failures: int = 5,
        breaker_cooldown: float = 5.0,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
    ) -> None:
        url = yarl.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"control plane url must be http(s)://host[:port], not {base_url!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number, not {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        # Keep any path prefix (a control plane behind a path-routing proxy).
        self._base = str(url.with_query(None).with_fragment(None)).rstrip("/")
        self._token = token
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = Backoff(backoff_base, backoff_cap, rng)
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown)
        self._session = session
        self._owns_session = session is None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it; the client is unusable after."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("ControlPlaneClient is closed")
        if self._session is None:
            # Created here, not in __init__, so it binds to the loop that uses it.
            self._session = aiohttp.ClientSession()
        return self._session

    def budget(self, attempt_timeout: float | None = None, retry: bool = True) -> float:
        """The longest one call may take: every attempt timing out plus every backoff."""
        per_attempt = self.timeout if attempt_timeout is None else attempt_timeout
        retries = self.retries if retry else 0
        return per_attempt * (retries + 1) + self.backoff.budget(retries)

    # ------------------------------------------------------------------ core

    async def _call(
        self,
        method: str,
        path: str,
        decode: Callable[[bytes], T],
        *,
        body: msgspec.Struct | None = None,
        params: Mapping[str, str] | None = None,
        retry: bool,
        attempt_timeout: float | None = None,
    ) -> T:
        """One API call: attempts under the breaker, bounded by the call's budget."""
        where = f"{method} {path}"
        url = yarl.URL(self._base + path, encoded=True)
        if params:
            url = url.update_query(params)
        data = _encoder.encode(body) if body is not None else None
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        per_attempt = self.timeout if attempt_timeout is None else attempt_timeout
        retries = self.retries if retry else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget(per_attempt, retry)
        session = self._get_session()
        last_error: ControlPlaneError | None = None

        for attempt in range(retries + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            ticket = self.breaker.allow()
            if ticket is None:
                error = Unavailable(
                    f"circuit open: {where} not sent; control plane failing, "
                    f"next probe in {self.breaker.retry_after():.1f}s"
                )
                raise error from last_error
            try:
                status, resp_headers, payload = await self._attempt(
                    session, method, url, headers, data, min(per_attempt, remaining)
                )
            except _TRANSPORT_ERRORS as exc:
                self.breaker.failure(ticket)
                last_error = Unavailable(f"{where}: {_describe(exc)}")
                last_error.__cause__ = exc
                wait_at_least = 0.0
            except BaseException:
                # Cancelled, or a bug: no verdict on the server, but free a probe slot.
                self.breaker.release(ticket)
                raise
            else:
                if status >= 500 and not _deliberate_refusal(payload):
                    self.breaker.failure(ticket)
                else:
                    self.breaker.success(ticket)
                if 200 <= status < 300:
                    try:
                        return decode(payload)
                    except msgspec.MsgspecError as exc:
                        raise ControlPlaneError(f"{where}: undecodable answer: {exc}") from exc
                last_error = _error_from(status, payload, where)
                if status not in RETRY_STATUSES:
                    raise last_error
                wait_at_least = _retry_after(resp_headers) or 0.0

            if attempt == retries:
                break
            # Retry-After stretches the jittered delay, within the cap and the budget.
            delay = max(self.backoff.delay(attempt), min(wait_at_least, self.backoff.cap))
            remaining = deadline - loop.time()
            if delay >= remaining:
                break
            log.debug(
                "%s: retry %d/%d in %.3fs: %s", where, attempt + 1, retries, delay, last_error
            )
            await asyncio.sleep(delay)

        if last_error is None:
            last_error = Unavailable(f"{where}: no attempt fitted in the call's budget")
        elif retries:
            last_error.message = f"{last_error.message} (gave up after {attempt + 1} attempts)"
            last_error.args = (last_error.message,)
        raise last_error

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: yarl.URL,
        headers: Mapping[str, str],
        data: bytes | None,
        timeout: float,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP exchange, status line to last body byte, inside `timeout`."""
        # aiohttp's total timeout bounds the exchange; asyncio.timeout is the backstop
        # for anything aiohttp's timer does not cover.
        async with asyncio.timeout(timeout):
            async with session.request(
                method,
                url,
                headers=headers,
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
                raise_for_status=False,
            ) as resp:
                ok = 200 <= resp.status < 300
                limit = MAX_RESPONSE_BYTES if ok else _ERROR_BODY_BYTES
                payload = await self._read(resp, limit, truncate=not ok)
                return resp.status, resp.headers, payload

    @staticmethod
    async def _read(resp: aiohttp.ClientResponse, limit: int, truncate: bool) -> bytes:
        """The body, at most `limit` bytes: an error body is cut, a success body refused."""
        if resp.content_length is not None and resp.content_length > limit and not truncate:
            raise TooLarge(f"control plane answer of {resp.content_length} bytes is over {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await resp.content.read(64 * 1024)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                if truncate:
                    chunks.append(chunk[: limit - (size - len(chunk))])
                    return b"".join(chunks)
                raise TooLarge(f"control plane answer over {limit} bytes")
            chunks.append(chunk)

    # ------------------------------------------------------------------ allocations

    async def create_allocation(self, app: str, idempotency_key: str | None = None) -> Allocation:
        """Ask for an allocation of `app`; the same idempotency key returns the same one."""
        return await self._call(
            "POST",
            "/v1/allocations",
            _decode_allocation,
            body=CreateAllocation(app=app, idempotency_key=idempotency_key),
            # Without a key a repeat could start a second process.
            retry=idempotency_key is not None,
        )

    async def get_allocation(self, allocation_id: str) -> Allocation:
        path = f"/v1/allocations/{_segment(allocation_id, 'allocation id')}"
        return await self._call("GET", path, _decode_allocation, retry=True)

    async def list_allocations(self, app: str | None = None) -> list[Allocation]:
        params = {"app": app} if app is not None else None
        wrapped = await self._call(
            "GET", "/v1/allocations", _decode_allocations, params=params, retry=True
        )
        return wrapped.allocations

    async def watch_allocation(
        self, allocation_id: str, version: int, timeout: float = 30.0
    ) -> Allocation:
        """Long-poll: the allocation once its version passes `version`, or at `timeout`."""
        path = f"/v1/allocations/{_segment(allocation_id, 'allocation id')}/watch"
        return await self._call(
            "GET",
            path,
            _decode_allocation,
            params={"version": str(version), "timeout": _seconds(timeout)},
            retry=True,
            attempt_timeout=timeout + self.timeout,
        )

    async def drain_allocation(self, allocation_id: str, deadline_s: float) -> Allocation:
        path = f"/v1/allocations/{_segment(allocation_id, 'allocation id')}/drain"
        body = DrainRequest(deadline_s=deadline_s)
        return await self._call("POST", path, _decode_allocation, body=body, retry=True)

    async def stop_allocation(self, allocation_id: str) -> Allocation:
        path = f"/v1/allocations/{_segment(allocation_id, 'allocation id')}/stop"
        return await self._call("POST", path, _decode_allocation, retry=True)

    # ------------------------------------------------------------------ hosts

    async def list_hosts(self) -> list[Host]:
        wrapped = await self._call("GET", "/v1/hosts", _decode_hosts, retry=True)
        return wrapped.hosts

    async def get_host(self, name: str) -> Host:
        path = f"/v1/hosts/{_segment(name, 'host name')}"
        return await self._call("GET", path, _decode_host, retry=True)

    async def cordon_host(self, name: str) -> Host:
        path = f"/v1/hosts/{_segment(name, 'host name')}/cordon"
        return await self._call("POST", path, _decode_host, retry=True)

    async def drain_host(self, name: str, deadline_s: float, replace: bool = True) -> Host:
        path = f"/v1/hosts/{_segment(name, 'host name')}/drain"
        body = HostDrainRequest(deadline_s=deadline_s, replace=replace)
        return await self._call("POST", path, _decode_host, body=body)

    async def uncordon_host(self, name: str) -> Host:
        path = f"/v1/hosts/{_segment(name, 'host name')}/uncordon"
        return await self._call("POST", path, _decode_host, retry=True)

    # ------------------------------------------------------------------ routes

    async def route_snapshot(self) -> RouteSnapshot:
        return await self._call("GET", "/v1/routes", _decode_snapshot, retry=True)

    async def route_changes(
        self, after: int, timeout: float = 30.0, edge_id: str | None = None
    ) -> RouteChanges:
        """Long-poll: route changes after epoch `after`; Gone when history no longer has it.

        With `edge_id`, the poll also tells the control plane that edge is alive.
        """
        params = {"after": str(after), "timeout": _seconds(timeout)}
        if edge_id is not None:
            params["edge_id"] = edge_id
        return await self._call(
            "GET",
            "/v1/routes/changes",
            _decode_changes,
            params=params,
            retry=True,
            attempt_timeout=timeout + self.timeout,
        )

    async def route_cas(self, app: str, expected_epoch: int, allocation_ids: list[str]) -> AppRoute:
        """Compare-and-set the app's route; Conflict when its epoch is not `expected_epoch`."""
        body = RouteCas(app=app, expected_epoch=expected_epoch, allocation_ids=allocation_ids)
        # Never retried: a lost answer may hide a success, and a repeat would then conflict.
        return await self._call("POST", "/v1/routes/cas", _decode_app_route, body=body, retry=False)

    # ------------------------------------------------------------------ edges

    async def register_edge(self, edge_id: str) -> EdgeInfo:
        body = EdgeRegistration(edge_id=edge_id)
        return await self._call("POST", "/v1/edges", _decode_edge, body=body, retry=True)

    async def ack_epoch(self, edge_id: str, epoch: int) -> EdgeInfo:
        path = f"/v1/edges/{_segment(edge_id, 'edge id')}/ack"
        body = EdgeAck(edge_id=edge_id, epoch=epoch)
        return await self._call("POST", path, _decode_edge, body=body, retry=True)

    async def list_edges(self) -> list[EdgeInfo]:
        wrapped = await self._call("GET", "/v1/edges", _decode_edges, retry=True)
        return wrapped.edges

    # ------------------------------------------------------------------ promotions

    async def create_promotion(
        self,
        app: str,
        allocation_id: str,
        expected_epoch: int | None = None,
        propagation_timeout_s: float = 30.0,
    ) -> Promotion:
        body = CreatePromotion(
            app=app,
            allocation_id=allocation_id,
            expected_epoch=expected_epoch,
            propagation_timeout_s=propagation_timeout_s,
        )
        # Never retried: a repeat after a lost answer would start a second promotion.
        return await self._call("POST", "/v1/promotions", _decode_promotion, body=body, retry=False)

    async def get_promotion(self, promotion_id: str) -> Promotion:
        path = f"/v1/promotions/{_segment(promotion_id, 'promotion id')}"
        return await self._call("GET", path, _decode_promotion, retry=True)

    async def approve_promotion(self, promotion_id: str) -> Promotion:
        path = f"/v1/promotions/{_segment(promotion_id, 'promotion id')}/approve"
        return await self._call("POST", path, _decode_promotion, retry=True)

    # ------------------------------------------------------------------ machines

    async def machine_report(self) -> MachinesReport:
        """Each machine the control plane drives: instances per state, reason codes, moves."""
        return await self._call("GET", "/v1/machines", _decode_machines, retry=True)

    # ------------------------------------------------------------------ region

    async def get_region(self) -> Region:
        return await self._call("GET", "/v1/region", _decode_region, retry=True)

    async def set_region(self, state: str, reason: str = "") -> Region:
        try:
            body = msgspec.convert({"state": state, "reason": reason}, SetRegion)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"region state: {exc}") from None
        return await self._call("PUT", "/v1/region", _decode_region, body=body, retry=True)


def _decoder(kind: Any) -> Callable[[bytes], Any]:
    return msgspec.json.Decoder(kind).decode


_decode_allocation: Callable[[bytes], Allocation] = _decoder(Allocation)
_decode_allocations: Callable[[bytes], _Allocations] = _decoder(_Allocations)
_decode_host: Callable[[bytes], Host] = _decoder(Host)
_decode_hosts: Callable[[bytes], _Hosts] = _decoder(_Hosts)
_decode_snapshot: Callable[[bytes], RouteSnapshot] = _decoder(RouteSnapshot)
_decode_changes: Callable[[bytes], RouteChanges] = _decoder(RouteChanges)
_decode_app_route: Callable[[bytes], AppRoute] = _decoder(AppRoute)
_decode_edge: Callable[[bytes], EdgeInfo] = _decoder(EdgeInfo)
_decode_edges: Callable[[bytes], _Edges] = _decoder(_Edges)
_decode_promotion: Callable[[bytes], Promotion] = _decoder(Promotion)
_decode_region: Callable[[bytes], Region] = _decoder(Region)
_decode_machines: Callable[[bytes], MachinesReport] = _decoder(MachinesReport)
