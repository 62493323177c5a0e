"""Header rewriting without sockets: the sans-I/O functions in edge.http.forward_headers."""

from __future__ import annotations

import pytest

from edge.http.forward_headers import (
    BODY_CHUNKED,
    BODY_EOF,
    BODY_LENGTH,
    BODY_NONE,
    BODY_RECHUNKED_EOF,
    DROP,
    IDENTITY,
    KEEP,
    HeaderClasses,
    RequestFields,
    TrustedProxies,
    build_request_head,
    build_response_head,
    error_response,
    header_class,
)


def _head_lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    return [tuple(line.split(b": ", 1)) for line in _head_lines(head)[1:]]  # type: ignore[misc]


def _request(headers, trusted=False, **kw) -> bytes:
    fields = RequestFields(headers, trusted)
    options = dict(
        host=b"app.example",
        client_ip=b"10.1.2.3",
        scheme=b"http",
        request_id=b"rid-1",
        body=b"",
    )
    options.update(kw)
    return build_request_head(b"GET", b"/p?q=1", fields, **options)


def test_header_class_is_case_insensitive() -> None:
    assert header_class(b"Keep-Alive") == header_class(b"keep-alive") == DROP
    assert header_class(b"X-Custom") == KEEP


def test_request_drops_hop_by_hop_and_connection_named_fields() -> None:
    head = _request(
        [
            (b"Host", b"app.example"),
            (b"Connection", b"keep-alive, X-Drop-Me"),
            (b"X-Drop-Me", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Proxy-Authorization", b"Basic eA=="),
            (b"Trailer", b"X-T"),
            (b"Upgrade", b"h2c"),
            (b"X-Keep", b"yes"),
        ]
    )
    names = {name.lower() for name, _ in _fields(head)}
    for dropped in (
        b"connection",
        b"x-drop-me",
        b"keep-alive",
        b"te",
        b"proxy-connection",
        b"proxy-authorization",
        b"trailer",
        b"upgrade",
    ):
        assert dropped not in names
    assert b"x-keep" in names
    assert _head_lines(head)[0] == b"GET /p?q=1 HTTP/1.1"


def test_duplicate_fields_keep_order_and_multiplicity() -> None:
    head = _request([(b"Host", b"h"), (b"X-A", b"1"), (b"X-A", b"2"), (b"Cookie", b"c=1")])
    assert [v for n, v in _fields(head) if n == b"X-A"] == [b"1", b"2"]


def test_untrusted_client_forwarding_headers_replaced() -> None:
    head = _request(
        [
            (b"Host", b"h"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil"),
            (b"Forwarded", b"for=6.6.6.6"),
        ]
    )
    fields = dict(_fields(head))
    assert fields[b"X-Forwarded-For"] == b"10.1.2.3"
    assert fields[b"X-Forwarded-Proto"] == b"http"
    assert fields[b"X-Forwarded-Host"] == b"app.example"
    assert b"Forwarded" not in fields


def test_trusted_proxy_forwarding_headers_extended() -> None:
    head = _request(
        [
            (b"Host", b"h"),
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"X-Forwarded-For", b"2.2.2.2"),
            (b"X-Forwarded-Proto", b"https"),
        ],
        trusted=True,
    )
    fields = _fields(head)
    assert [v for n, v in fields if n == b"X-Forwarded-For"] == [b"1.1.1.1, 2.2.2.2, 10.1.2.3"]
    assert [v for n, v in fields if n == b"X-Forwarded-Proto"] == [b"https"]


def test_connection_cannot_strip_the_edges_own_fields() -> None:
    head = _request([(b"Host", b"h"), (b"Connection", b"X-Forwarded-For, X-Request-Id")])
    fields = dict(_fields(head))
    assert fields[b"X-Forwarded-For"] == b"10.1.2.3"
    assert fields[b"X-Request-Id"] == b"rid-1"


def test_request_framing_is_the_edges_choice() -> None:
    fields = RequestFields(
        [(b"Host", b"h"), (b"Content-Length", b"5"), (b"Expect", b"100-continue")], False
    )
    assert fields.content_length == b"5" and fields.expect == b"100-continue"
    head = build_request_head(
        b"POST",
        b"/",
        fields,
        host=b"h",
        client_ip=b"1.2.3.4",
        scheme=b"http",
        request_id=b"r",
        body=b"Transfer-Encoding: chunked",
    )
    names = [n.lower() for n, _ in _fields(head)]
    assert names.count(b"transfer-encoding") == 1
    assert b"content-length" not in names and b"expect" not in names


def test_request_fields_record_routing_facts() -> None:
    fields = RequestFields(
        [
            (b"host", b"A.example:80"),
            (b"HOST", b"b.example"),
            (b"Transfer-Encoding", b"gzip, chunked"),
            (b"X-Request-Id", b"abc"),
        ],
        True,
    )
    assert fields.host_count == 2
    assert fields.transfer_encoding == b"gzip, chunked" and not fields.chunked
    assert fields.request_id == b"abc"


def test_upgrade_request_keeps_upgrade_headers() -> None:
    fields = RequestFields(
        [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], False
    )
    head = build_request_head(
        b"GET",
        b"/ws",
        fields,
        host=b"h",
        client_ip=b"1.2.3.4",
        scheme=b"http",
        request_id=b"r",
        body=b"",
        upgrade=True,
    )
    fields_out = dict(_fields(head))
    assert fields_out[b"Connection"] == b"upgrade"
    assert fields_out[b"Upgrade"] == b"websocket"


@pytest.mark.parametrize(
    ("status", "headers", "head_request", "http10", "mode", "framing"),
    [
        (200, [(b"Content-Length", b"3")], False, False, BODY_LENGTH, b"Content-Length: 3"),
        (200, [], False, False, BODY_RECHUNKED_EOF, b"Transfer-Encoding: chunked"),
        (200, [(b"Transfer-Encoding", b"chunked")], False, False, BODY_CHUNKED, b"chunked"),
        (200, [], False, True, BODY_EOF, b"Connection: close"),
        (200, [(b"Content-Length", b"3")], True, False, BODY_NONE, b"Content-Length: 3"),
        (204, [], False, False, BODY_NONE, b""),
        (304, [(b"ETag", b'"x"')], False, False, BODY_NONE, b'ETag: "x"'),
    ],
)
def test_response_framing(status, headers, head_request, http10, mode, framing) -> None:
    head, got = build_response_head(
        status,
        b"",
        headers,
        head_request=head_request,
        keep_alive=True,
        http10_client=http10,
    )
    assert got == mode
    assert framing in head
    assert head.lower().count(b"transfer-encoding") <= 1


def test_response_drops_hop_by_hop_but_keeps_set_cookie_order() -> None:
    head, _ = build_response_head(
        200,
        b"OK",
        [
            (b"Connection", b"close, X-Secret"),
            (b"X-Secret", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Content-Length", b"0"),
        ],
        head_request=False,
        keep_alive=True,
        http10_client=False,
    )
    fields = _fields(head)
    names = [n.lower() for n, _ in fields]
    assert b"x-secret" not in names and b"keep-alive" not in names
    assert [v for n, v in fields if n == b"Set-Cookie"] == [b"a=1", b"b=2"]
    assert b"connection" not in names  # keep-alive to the client is the default


def test_error_response_is_one_short_line() -> None:
    raw = error_response(404, "no app serves this host", close=True, kind="no_route")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 404 Not Found")
    assert body == b"edge: no app serves this host\n"
    assert f"Content-Length: {len(body)}".encode() in head
    head_only = error_response(404, "x", close=True, head=True)
    assert head_only.endswith(b"\r\n\r\n")


def test_trusted_proxies_match_cidrs() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "::1/128"])
    assert "10.9.8.7" in trusted and "::1" in trusted
    assert "11.0.0.1" not in trusted and "not-an-ip" not in trusted
    assert "10.0.0.1" not in TrustedProxies([])


IDENTITY_FIELDS = [
    (b"X-Real-IP", b"6.6.6.6"),
    (b"true-client-ip", b"6.6.6.6"),
    (b"X-Client-IP", b"6.6.6.6"),
    (b"X-Forwarded-Port", b"6666"),
    (b"X-Forwarded-Prefix", b"/evil"),
]


def test_untrusted_client_identity_fields_dropped_and_request_id_not_taken() -> None:
    fields = RequestFields([(b"Host", b"h"), *IDENTITY_FIELDS, (b"X-Request-Id", b"mine")], False)
    assert fields.lines == []
    assert fields.request_id == b""


def test_trusted_proxy_identity_fields_and_request_id_kept() -> None:
    fields = RequestFields([(b"Host", b"h"), *IDENTITY_FIELDS, (b"X-Request-Id", b"mine")], True)
    kept = [(fields.lines[i], fields.lines[i + 2]) for i in range(0, len(fields.lines), 4)]
    assert kept == IDENTITY_FIELDS
    assert fields.request_id == b"mine"


def test_identity_fields_are_configurable() -> None:
    classes = HeaderClasses(["X-Tenant-IP"])
    assert classes.classify(b"x-tenant-ip") == IDENTITY
    assert classes.classify(b"X-Real-IP") == KEEP
    # A field the edge handles itself keeps its own meaning.
    assert HeaderClasses(["X-Forwarded-For"]).classify(b"X-Forwarded-For") != IDENTITY
    fields = RequestFields([(b"X-Tenant-IP", b"1"), (b"X-Real-IP", b"2")], False, classes)
    assert fields.lines == [b"X-Real-IP", b": ", b"2", b"\r\n"]


def test_identity_fields_pass_through_in_responses() -> None:
    head, _ = build_response_head(
        200,
        b"OK",
        [(b"X-Real-IP", b"1.2.3.4"), (b"Content-Length", b"0")],
        head_request=False,
        keep_alive=True,
        http10_client=False,
    )
    assert b"X-Real-IP: 1.2.3.4" in head
