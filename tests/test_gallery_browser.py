"""The gallery page in a real browser: headless chromium over the DevTools protocol
(tests/browser.py) loads /gallery from a real edge (Redis, the local control plane, a
scale-to-zero app and a webhook app), and the page follows a wake and a cold webhook
without a reload. Screenshots go to tests/artifacts/ (desktop and 390 px wide)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from browser import Page, launch_browser
from helpers import TESTS
from stack import CONTROL_PLANE_TOKEN, sample_app_spec
from webhooks import HOST as SHOP_HOST
from webhooks import WebhookApp, shop

from edge.ops.gallery_page import add_gallery_page

ARTIFACTS = TESTS / "artifacts"
DESKTOP = (1280, 900)
PHONE = (390, 844)
WAKE_PATH = [
    ("cold", "wake_requested"),
    ("wake_requested", "starting"),
    ("starting", "readiness_wait"),
    ("readiness_wait", "hot"),
]
RENDERED = "document.body.dataset.pollState === 'ok'"


@pytest.fixture
async def page(tmp_path) -> AsyncIterator[Page]:
    async with launch_browser(tmp_path) as browser_page:
        await browser_page.set_viewport(*DESKTOP)
        yield browser_page


def hello() -> dict[str, Any]:
    return {
        "name": "hello",
        "hosts": ["hello.localhost"],
        "scale_to_zero": True,
        "hold_timeout": "15s",
        "readiness_timeout": "10s",
        "idle_timeout": "5m",
    }


def dataset(selector: str, key: str) -> str:
    """JS: data-<key> of the first element `selector` finds (null when none does)."""
    return f"(document.querySelector({json.dumps(selector)}) || {{dataset: {{}}}}).dataset.{key}"


def journal(app: str, machine: str = "wake") -> str:
    """JS: the app's journal rows on the page, oldest first, as [from, to] pairs."""
    rows = f'[data-transition="{machine}"][data-app="{app}"]'
    return (
        f"[...document.querySelectorAll({json.dumps(rows)})].reverse()"
        ".map(row => [row.dataset.from, row.dataset.to])"
    )


def faults(page: Page) -> list[str]:
    """The page's errors but the refused requests the browser logs (a 401 is expected)."""
    return [error for error in page.errors if not error.startswith("log (network)")]


async def next_render(page: Page) -> None:
    """Wait for a poll after the current one to render."""
    seen = await page.evaluate("document.body.dataset.lastUpdate")
    await page.wait_for(
        f"document.body.dataset.lastUpdate !== {json.dumps(seen)} && {RENDERED}",
        what="the next render",
    )


async def test_the_page_follows_a_wake_and_a_cold_webhook_without_a_reload(
    start_control_plane, start_edge, fresh_redis, client, page, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path)
    cp = start_control_plane(apps=[sample_app_spec("hello"), hooks.spec])
    edge = start_edge(
        apps=[hello(), shop()],
        edge={"store": fresh_redis},
        sections={"control_plane": {"url": cp.url}, "budget": {"wake_lease_ttl": "2s"}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )
    await page.navigate(f"{edge.admin_url}/gallery")
    await page.wait_for(RENDERED, what="the first render")
    await page.evaluate("window.sameDocument = 'yes'")  # gone if the page ever reloads
    machines = await page.evaluate("[...document.querySelectorAll('[data-machine]')].length")
    assert machines >= 1
    assert await page.evaluate(dataset('[data-app="hello"]', "appState")) == "cold"
    assert await page.evaluate(journal("hello")) == []

    async with client.get(edge.url + "/", headers={"Host": "hello.localhost"}) as resp:
        assert resp.status == 200, await resp.text()
    await page.wait_for(
        f"{dataset('[data-machine=wake] [data-state=hot]', 'count')} === '1'",
        what="the Wake machine's hot count to become 1",
    )
    await page.wait_for(
        f"{journal('hello')}.some(([from, to]) => from === 'readiness_wait' && to === 'hot')",
        what="hello's journal to show readiness_wait -> hot",
    )
    assert await page.evaluate(journal("hello")) == [list(move) for move in WAKE_PATH]
    assert await page.evaluate(dataset('[data-app="hello"]', "appState")) == "hot"

    cold_webhooks = "[data-machine=wake] [data-failure=payment_webhook_while_cold]"
    webhook_count = dataset(cold_webhooks, "count")
    before = int(await page.evaluate(webhook_count))
    headers = {"Host": SHOP_HOST, "X-Event-Id": f"evt_{uuid.uuid4().hex}"}
    async with client.post(edge.url + "/hooks/pay", data=b"{}", headers=headers) as resp:
        assert resp.status == 202, await resp.text()
    await page.wait_for(
        f"{webhook_count} === '{before + 1}'",
        what="the payment-webhook-while-cold counter to go up by one",
    )
    assert await page.evaluate("window.sameDocument") == "yes", "the page reloaded"

    await page.screenshot(ARTIFACTS / "gallery.png")
    await page.set_viewport(*PHONE, scale=2, mobile=True)
    await next_render(page)
    # Phone width: nothing wider than the screen, so no sideways scrolling.
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE[0]
    await page.screenshot(ARTIFACTS / "gallery-phone.png")
    assert faults(page) == []


async def test_the_page_asks_for_the_admin_token_when_reads_need_it(start_edge, page) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    edge = start_edge(edge={"admin_token": secret})
    form_shown = "!document.getElementById('token-form').hidden"
    message = "document.getElementById('token-message').textContent"
    await page.navigate(f"{edge.admin_url}/gallery")
    await page.wait_for(form_shown, what="the token form")
    assert await page.evaluate("document.querySelectorAll('[data-machine]').length") == 0

    await page.type_text("#token-input", "wrong")
    await page.click("#token-form button")
    await page.wait_for(f"{form_shown} && {message}.includes('refused')", what="a refusal")
    assert await page.evaluate("sessionStorage.getItem('edge-admin-token')") is None

    await page.type_text("#token-input", secret)
    await page.click("#token-form button")
    await page.wait_for(RENDERED, what="a render with the token")
    assert await page.evaluate("document.getElementById('token-form').hidden")
    assert await page.evaluate(dataset('[data-app="echo"]', "appState")) == "hot"
    assert await page.evaluate("document.querySelectorAll('[data-machine]').length") >= 1
    assert await page.evaluate("sessionStorage.getItem('edge-admin-token')") == secret

    # The tab keeps the token: a reload renders without asking again.
    await page.navigate(f"{edge.admin_url}/gallery")
    await page.wait_for(RENDERED, what="a render after a reload")
    assert await page.evaluate("document.getElementById('token-form').hidden")
    assert faults(page) == []


# ------------------------------------------- canned answers: hostile strings, failed polls

HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


def canned(now: float) -> dict[str, Any]:
    """An /admin/gallery answer (the schema's shape) with app-controlled strings everywhere."""
    return {
        "generated_at": now,
        "edge_id": HOSTILE,
        "sources": {
            "store": {"name": "memory://", "ok": True, "stale_since": None, "error": ""},
            "control_plane": {
                "name": "http://127.0.0.1:9",
                "ok": False,
                "stale_since": now - 42,
                "error": "connection refused",
                "configured": True,
            },
        },
        "machines": [
            {
                "name": "wake",
                "title": "Wake",
                "owner": "edge",
                "reported": True,
                "counts_scope": "region",
                "states": [{"name": "cold", "count": 1}, {"name": "hot", "count": 0}],
                "transitions": [["cold", "hot"]],
                "gates": [
                    {"id": "g", "name": HOSTILE, "description": HOSTILE, "guards": "hot",
                     "passed": 2, "refused": 1, "detected_by": ""},
                ],
                "failure_modes": [
                    {"id": "f", "name": "f", "description": "", "leads_to": "cold",
                     "count": 3, "detail": HOSTILE, "detected_by": ""},
                ],
            },
            {
                "name": "deploy_pipeline",
                "title": "Deploy pipeline",
                "owner": "control plane",
                "reported": False,
                "counts_scope": "region",
                "states": [{"name": "queued", "count": None}],
                "transitions": [],
                "gates": [],
                "failure_modes": [],
            },
        ],
        "apps": [
            {"name": HOSTILE, "tenant": HOSTILE, "scale_to_zero": True, "state": "cold",
             "reason": HOSTILE, "held": 0, "queued": 2, "dead_letters": 1, "hot_here": False,
             "last_wake": None, "allocations": [{"id": HOSTILE, "state": "ready",
                                                 "address": HOSTILE}]},
        ],
        "budget": {"limit": 4, "tenant_limit": 2, "in_use": 1, "waiting": 0,
                   "by_tenant": {HOSTILE: 1}},
        "transitions": [
            {"at": now - 1, "machine": "wake", "app": HOSTILE, "from_state": "cold",
             "to_state": "hot", "reason": HOSTILE, "reason_code": HOSTILE, "edge_id": HOSTILE},
        ],
    }  # fmt: skip


# Counts the page's fetches as it makes them: how many at once at most, which methods.
COUNT_FETCHES = """
(() => {
  const seen = { now: 0, most: 0, methods: [], urls: [] };
  window.fetches = seen;
  const fetch = window.fetch.bind(window);
  window.fetch = async (url, options = {}) => {
    seen.now += 1;
    seen.most = Math.max(seen.most, seen.now);
    seen.methods.push(options.method || "GET");
    seen.urls.push(String(url));
    try { return await fetch(url, options); } finally { seen.now -= 1; }
  };
})();
"""


async def test_data_renders_as_text_and_a_failed_poll_keeps_the_last_view(page) -> None:
    # Canned answers from a plain aiohttp app serving the real page module.
    mode = {"now": "ok"}
    released = asyncio.Event()

    async def answer(_: web.Request) -> web.Response:
        if mode["now"] == "hang":
            await released.wait()
        if mode["now"] != "ok":
            return web.Response(status=503, text="down\n")
        return web.json_response(canned(time.time()))

    app = web.Application()
    add_gallery_page(app)
    app.router.add_get("/admin/gallery", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    status = "document.getElementById('status').innerText"
    try:
        await page.add_init_script(COUNT_FETCHES)
        await page.navigate(f"http://127.0.0.1:{port}/gallery")
        await page.wait_for(RENDERED, what="the first render")
        body = await page.evaluate("document.body.innerText")
        assert HOSTILE in body, "app-controlled strings are shown as text"
        assert await page.evaluate("document.querySelectorAll('img, main script').length") == 0
        assert await page.evaluate("typeof window.pwned") == "undefined"
        header = await page.evaluate(status)
        assert "control plane http://127.0.0.1:9: stale since" in header
        assert "(42s ago): connection refused" in header
        pipeline = "[data-machine=deploy_pipeline]"
        assert "not reported" in await page.evaluate(
            f"document.querySelector('{pipeline}').innerText"
        )
        assert await page.evaluate(dataset(f"{pipeline} [data-state=queued]", "count")) == ""
        assert await page.evaluate(dataset("[data-gate=g]", "refused")) == "1"
        assert await page.evaluate(dataset("[data-failure=f]", "count")) == "3"
        # Each poll rebuilds the view; a box the reader opened stays open.
        await page.click("[data-machine=wake] details.moves summary")
        await next_render(page)
        assert await page.evaluate("document.querySelector('[data-machine=wake] details').open")
        last = await page.evaluate("document.body.dataset.lastUpdate")

        mode["now"] = "fail"
        await page.wait_for(
            f"{status}.includes('edge unreachable since')",
            what="the page to say the edge is unreachable",
        )
        # The last data stays on screen.
        assert await page.evaluate("document.querySelectorAll('[data-app-state]').length") == 1
        assert await page.evaluate("document.body.dataset.lastUpdate") == last
        await page.screenshot(ARTIFACTS / "gallery-unreachable.png", full_page=False)

        # An answer that never comes: the poll gives up (4 s) and the next one starts.
        mode["now"] = "hang"
        await page.wait_for(
            f"{status}.includes('no answer in 4s')", timeout=10, what="the poll's timeout"
        )
        mode["now"] = "ok"
        released.set()
        await page.wait_for(
            f"{RENDERED} && document.body.dataset.lastUpdate !== {json.dumps(last)}",
            what="a render once the edge answers again",
        )
        fetches = await page.evaluate("window.fetches")
        assert fetches["most"] == 1, f"polls overlapped: {fetches}"
        assert set(fetches["methods"]) == {"GET"} and set(fetches["urls"]) == {"/admin/gallery"}
        assert faults(page) == []
    finally:
        released.set()
        await runner.cleanup()
