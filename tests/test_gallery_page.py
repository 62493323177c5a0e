"""The gallery page without a browser: what a real edge's admin listener serves at /gallery
and / to a caller without the token, that /admin/gallery keeps the read auth, that the
page is package data, and that the HTML loads nothing from elsewhere nor parses data as HTML."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from helpers import ROOT

from edge.ops.gallery_page import CONTENT_SECURITY_POLICY, page_html

PAGE = ROOT / "edge" / "ops" / "gallery_page.html"


async def test_page_and_redirect_need_no_token_but_the_data_does(start_edge, client) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    edge = start_edge(edge={"admin_token": secret})  # the operator's token: reads closed too
    base = edge.admin_url
    async with client.get(base + "/gallery") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert await resp.read() == PAGE.read_bytes()
    async with client.head(base + "/gallery") as resp:
        assert resp.status == 200
    async with client.get(base + "/", allow_redirects=False) as resp:
        assert resp.status in (302, 303)
        assert resp.headers["Location"] == "/gallery"
    # Public for reads only: nothing else about these paths, and nothing else, opens up.
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/gallery", "/"):
            async with client.request(method, base + path) as resp:
                assert resp.status == 401, (method, path)
    for path in ("/admin/gallery", "/metrics", "/admin/apps", "/gallery/"):
        async with client.get(base + path) as resp:
            assert resp.status == 401, path
    async with client.get(base + "/admin/gallery", headers={"Authorization": "Bearer no"}) as resp:
        assert resp.status == 401
    async with client.get(base + "/admin/gallery", headers=edge.admin_headers()) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    assert {"generated_at", "machines", "apps", "transitions", "sources"} <= data.keys()


def test_the_page_loads_nothing_from_elsewhere() -> None:
    html = PAGE.read_text()
    assert "http://" not in html and "https://" not in html
    # No attribute or CSS that points anywhere but this page: protocol-relative included.
    pointer = r"""\b(src|href|action|srcset|poster)\s*=\s*["']?\s*(//|(?!data:)[a-z]+:)"""
    assert not re.search(pointer, html)
    assert re.findall(r"""\bhref\s*=\s*["']([^"']*)""", html) == ["data:,"]
    assert not re.search(r"@import|url\s*\(", html)
    assert html.count("<script") == 1 and "<script src" not in html
    assert "<link" not in html.replace('<link rel="icon" href="data:,">', "")


def test_the_page_never_parses_data_as_html_and_only_reads() -> None:
    html = PAGE.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in html, sink
    assert "new Function" not in html and "DOMParser" not in html
    # One request in the page: GET /admin/gallery.
    assert html.count("fetch(") == 1
    assert re.findall(r"""method:\s*["'](\w+)""", html) == ["GET"]
    assert 'const DATA_URL = "/admin/gallery";' in html


def test_the_page_ships_as_package_data(tmp_path: Path) -> None:
    # Built from a copy: a build in the worktree would leave an egg-info behind.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("edge", "wake", "scheduler_client"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    result = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = tmp_path / "build" / "lib" / "edge" / "ops" / "gallery_page.html"
    assert built.read_bytes() == page_html()
