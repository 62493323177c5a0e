"""Pure unit tests of edge.http.host_pattern: normalisation, Host header parsing, lookup order."""

from __future__ import annotations

import pytest

from edge.http.host_pattern import (
    HostPatternError,
    HostTable,
    host_from_header,
    normalize_host_header,
    normalize_host_pattern,
)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("app.example.com", "app.example.com"),
        ("App.Example.COM", "app.example.com"),
        ("app.example.com.", "app.example.com"),
        ("  app.example.com  ", "app.example.com"),
        ("*.Example.com", "*.example.com"),
        ("*.localhost", "*.localhost"),
        ("localhost", "localhost"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("x" * 63 + ".com", "x" * 63 + ".com"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_normalize_accepts_and_lowercases(pattern: str, expected: str) -> None:
    assert normalize_host_pattern(pattern) == expected


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        ".",
        "*",
        "*.",
        "foo.*.com",
        "*.*.example.com",
        "*example.com",
        "a..example.com",
        "-a.example.com",
        "a-.example.com",
        "a b.example.com",
        "x" * 64 + ".com",
        "app.example.com:8080",
        "app/example.com",
        "user@example.com",
        "exämple.com",
        "c_d.example",
    ],
)
def test_normalize_rejects_invalid(pattern: str) -> None:
    with pytest.raises(HostPatternError):
        normalize_host_pattern(pattern)


def test_host_pattern_error_is_a_value_error_naming_the_pattern() -> None:
    with pytest.raises(ValueError, match="foo"):
        normalize_host_pattern("foo.*.bar")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("app.localhost", "app.localhost"),
        ("Shop.Example.com:8080", "shop.example.com"),
        (b"Shop.Example.com:8080", "shop.example.com"),
        ("app.localhost.", "app.localhost"),
        ("app.localhost.:80", "app.localhost"),
        (" app.localhost ", "app.localhost"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
    ],
)
def test_host_from_header_valid(value: str | bytes, expected: str) -> None:
    assert host_from_header(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":80",
        "a b",
        "foo@bar",
        "user@app.localhost",
        "app.localhost:abc",
        "app.localhost:80:80",
        "app.localhost/path",
        "app.localhost?q",
        "app.localhost#f",
        "app\tlocalhost",
        "[::1",
        "[::1]x",
        "[::1]:x",
        b"\xffapp.localhost",
        "evil.com,x.example.com",
        "<script>.example.com",
        "a_b.example.com",
        "-a.example.com",
        "a-.example.com",
        "a..example.com",
        ".example.com",
        "example.com..",
        "x" * 64 + ".example.com",
        ("a" * 63 + ".") * 4 + "com",
        "app.localhost:99999",
        "app.localhost:",
        "app.localhost:123456",
        "[not-an-ip]",
        "[::1]:",
        "exämple.com",
    ],
)
def test_host_from_header_malformed(value: str | bytes) -> None:
    assert host_from_header(value) is None


def test_table_exact_beats_wildcard() -> None:
    table = HostTable({"*.example.com": "wild", "shop.example.com": "shop"})
    assert table.lookup("shop.example.com") == "shop"
    assert table.lookup("other.example.com") == "wild"


def test_wildcard_matches_any_depth_but_not_the_bare_domain() -> None:
    table = HostTable({"*.example.com": "wild"})
    assert table.lookup("a.example.com") == "wild"
    assert table.lookup("a.b.example.com") == "wild"
    assert table.lookup("example.com") is None
    assert table.lookup("notexample.com") is None
    assert table.lookup("a.example.com.evil.net") is None
    assert table.lookup("example.com.a") is None


def test_longest_wildcard_wins() -> None:
    table = HostTable({"*.example.com": "outer", "*.eu.example.com": "inner"})
    assert table.lookup("shop.eu.example.com") == "inner"
    assert table.lookup("a.shop.eu.example.com") == "inner"
    assert table.lookup("eu.example.com") == "outer"
    assert table.lookup("shop.us.example.com") == "outer"


def test_table_normalises_its_patterns() -> None:
    table = HostTable({"Shop.Example.COM.": 1, "*.Wild.Example.com": 2})
    assert table.lookup("shop.example.com") == 1
    assert table.lookup("x.wild.example.com") == 2


def test_table_returns_falsy_values() -> None:
    table = HostTable({"zero.example.com": 0, "*.zero.example.com": 0})
    assert table.lookup("zero.example.com") == 0
    assert table.lookup("x.zero.example.com") == 0


def test_unknown_host_and_empty_table() -> None:
    assert HostTable({}).lookup("app.localhost") is None
    assert HostTable({"app.localhost": 1}).lookup("other.localhost") is None


def test_table_rejects_invalid_pattern() -> None:
    with pytest.raises(HostPatternError):
        HostTable({"foo.*.com": 1})


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("App.LOCALHOST:8080", "app"),
        ("x.Example.Localhost", "wild"),
        ("exact.example.localhost:1", "exact"),
        ("example.localhost", None),
    ],
)
def test_header_then_lookup(header: str, expected: str | None) -> None:
    table = HostTable(
        {"app.localhost": "app", "*.example.localhost": "wild", "exact.example.localhost": "exact"}
    )
    host = host_from_header(header)
    assert host is not None
    assert table.lookup(host) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"X.Example.Com.:8080", b"x.example.com:8080"),
        (b"app.localhost", b"app.localhost"),
        (b"app.localhost.", b"app.localhost"),
        (b"[::1]:80", b"[::1]:80"),
        (b"evil.com,x.example.com", None),
        (b"x.example.com:0x50", None),
    ],
)
def test_normalize_host_header(value: bytes, expected: bytes | None) -> None:
    """The value the edge routes by and forwards as Host and X-Forwarded-Host."""
    assert normalize_host_header(value) == expected
