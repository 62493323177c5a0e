"""What the front decides about a request head before routing it: refusals, the origin
form of the target, the body framing to forward, `Expect`. Plain functions, no I/O."""

from __future__ import annotations

from edge.http.forward_headers import RequestFields
from edge.http.host_pattern import host_from_header

CONTENT_LENGTH = b"Content-Length: "
CHUNKED = b"Transfer-Encoding: chunked"


class Refused(Exception):
    """The edge answers this request itself: `status`, a one-line reason, X-Edge-Error `kind`."""

    def __init__(self, status: int, reason: str, kind: str, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind
        self.retry_after = retry_after


def check_head(method: bytes, fields: RequestFields) -> None:
    """Refuse what this edge never forwards: CONNECT, two Hosts, codings other than chunked."""
    if method == b"CONNECT":
        raise Refused(400, "CONNECT is not supported: this is not a forward proxy", "connect")
    if fields.host_count > 1:
        raise Refused(400, "more than one Host header", "host")
    if fields.transfer_encoding is not None and not fields.chunked:
        raise Refused(501, "only chunked transfer-coding is supported", "te")


def origin_form(target: bytes, host_value: bytes | None) -> tuple[bytes, bytes | None]:
    """'http://host/path?q' -> (b'/path?q', b'host'): the authority overrides Host.

    An origin-form target (or `*`) comes back as it is, with the Host header's value.
    """
    if target[:1] == b"/":
        return target, host_value
    lower = target[:8].lower()
    if lower.startswith(b"http://"):
        rest = target[7:]
    elif lower.startswith(b"https://"):
        rest = target[8:]
    elif target == b"*":
        return target, host_value
    else:
        raise Refused(400, "request target must be origin-form or absolute-form", "target")
    slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:slash], rest[slash:]
    if b"@" in authority or not authority:
        raise Refused(400, "absolute-form target with bad authority", "target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, authority


def no_route(host_value: bytes | None, absolute: bool) -> Refused:
    """Why no app takes a request for this Host (or absolute-form authority)."""
    if host_value is None:
        return Refused(400, "missing Host header", "host")
    if absolute:
        return Refused(400, "absolute-form target names a host not served here", "host")
    if host_from_header(host_value) is None:
        return Refused(400, "malformed Host header", "host")
    return Refused(404, "no app serves this host", "no_route")


def body_framing(fields: RequestFields, max_body: int) -> tuple[bytes, bool]:
    """(the framing header to forward, whether the body is already complete)."""
    if fields.content_length is not None:
        length = int(fields.content_length)
        if length > max_body:
            raise Refused(413, "request body too large", "body")
        return CONTENT_LENGTH + fields.content_length, not length
    if fields.chunked:
        return CHUNKED, False
    return b"", True


def sends_continue(fields: RequestFields, http10: bool, body_done: bool) -> bool:
    """Whether the edge answers `Expect: 100-continue` itself (it reads the body itself)."""
    if fields.expect is None:
        return False
    if fields.expect.strip().lower() != b"100-continue":
        raise Refused(417, "unsupported expectation", "expect")
    return not http10 and not body_done


def parse_error_status(message: str) -> int:
    """431 for a header overflow the parser reports, else 400."""
    text = message.lower()
    return 431 if "header" in text and "overflow" in text else 400


def pipeline_full(waiting: int, max_pipelined: int) -> bool:
    """Whether one more request may not be parsed ahead: `waiting` already wait behind
    the one being answered."""
    return waiting >= max_pipelined


def too_many_pipelined() -> Refused:
    return Refused(503, "too many pipelined requests on one connection", "pipeline")


def check_upgrade(upgrade: bool, body_done: bool) -> None:
    """Refuse an Upgrade request that carries a body: its bytes would be taken for the
    tunnel's, so the edge does not forward it."""
    if upgrade and not body_done:
        raise Refused(400, "an Upgrade request cannot carry a body here", "upgrade_body")


def app_gone(app: str) -> Refused:
    """For a request whose app a reload removed before it could be answered."""
    return Refused(404, f"app {app} is no longer served here", "no_route")
