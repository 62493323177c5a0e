"""Headless Chromium driven over the DevTools protocol with aiohttp's websocket client:
no selenium, nothing downloaded at run time (`make test` installs Debian's chromium).

    async with launch_browser(tmp_path) as page:
        await page.navigate(url)
        await page.wait_for("document.body.dataset.pollState === 'ok'", what="a render")

Chromium runs in its own process group, killed at the end; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 20.0
POLL_INTERVAL = 0.1
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_binary() -> str:
    """Debian's chromium on PATH; a failed test (not a skip) when it is missing."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "chromium is not installed; `make test` installs it (scripts/ensure-chromium), "
        "or: apt-get install chromium",
        pytrace=False,
    )


class DevToolsError(Exception):
    """A DevTools command answered with an error, or the page threw."""


class Page:
    """One page target over its DevTools websocket: commands, events, and the page's errors."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        # console.error, uncaught exceptions and browser log errors (a CSP refusal is one).
        self.errors: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                self._dispatch(json.loads(msg.data))
        finally:
            gone = DevToolsError("the DevTools connection closed")
            for future in [*self.pending.values(), *(f for _, f in self.waiters)]:
                if not future.done():
                    future.set_exception(gone)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            future = self.pending.pop(message["id"], None)
            if future is not None and not future.done():
                if "error" in message:
                    future.set_exception(DevToolsError(str(message["error"])))
                else:
                    future.set_result(message.get("result", {}))
            return
        method = message.get("method", "")
        params = message.get("params", {})
        self._note_error(method, params)
        for waiter in [w for w in self.waiters if w[0] == method]:
            self.waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(params)

    def _note_error(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            args = params.get("args", [])
            self.errors.append("console.error: " + " ".join(str(a.get("value", a)) for a in args))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')}")

    async def send(self, method: str, timeout: float = COMMAND_TIMEOUT, **params: Any) -> dict:
        """Send one DevTools command; its result."""
        ident = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DevToolsError(f"{method}: no answer in {timeout}s") from None
        finally:
            self.pending.pop(ident, None)

    def expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event (ask before causing it)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters.append((method, future))
        return future

    async def add_init_script(self, source: str) -> None:
        """Run `source` in every document this page loads, before the document's own scripts."""
        await self.send("Page.addScriptToEvaluateOnNewDocument", source=source)

    async def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Load `url` and wait for its load event."""
        loaded = self.expect("Page.loadEventFired")
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise DevToolsError(f"navigating to {url}: {result['errorText']}")
        try:
            await asyncio.wait_for(loaded, timeout)
        except TimeoutError:
            raise DevToolsError(f"{url} did not load in {timeout}s") from None

    async def evaluate(self, expression: str) -> Any:
        """The value of a JS expression in the page (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"{expression!r} threw: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, predicate: str, timeout: float = 15.0, what: str = "") -> Any:
        """Poll a JS expression until it is truthy; its value. AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = await self.evaluate(predicate)
            except DevToolsError as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            if time.monotonic() > deadline:
                status = await self._status_text()
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or predicate}: last {last!r}; "
                    f"page status: {status!r}; page errors: {self.errors}"
                )
            await asyncio.sleep(POLL_INTERVAL)

    async def _status_text(self) -> str:
        with contextlib.suppress(DevToolsError):
            text = await self.evaluate("document.body ? document.body.innerText : ''")
            return str(text)[:600]
        return "<unreadable>"

    async def click(self, selector: str) -> None:
        """A mouse click (press and release) on the middle of the element `selector` finds."""
        where = await self.evaluate(
            f"""(() => {{
                const node = document.querySelector({json.dumps(selector)});
                if (!node) return null;
                node.scrollIntoView({{block: "center"}});
                const box = node.getBoundingClientRect();
                return [box.x + box.width / 2, box.y + box.height / 2];
            }})()"""
        )
        if where is None:
            raise DevToolsError(f"nothing matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=where[0],
                y=where[1],
                button="left",
                clickCount=1,
            )

    async def type_text(self, selector: str, text: str) -> None:
        """Focus the element `selector` finds and type `text` into it, as a keyboard would."""
        found = await self.evaluate(
            f"(() => {{ const n = document.querySelector({json.dumps(selector)});"
            " if (!n) return false; n.focus(); return true; })()"
        )
        if not found:
            raise DevToolsError(f"nothing matches {selector!r}")
        await self.send("Input.insertText", text=text)

    async def set_viewport(
        self, width: int, height: int, scale: float = 1.0, mobile: bool = False
    ) -> None:
        """Emulate a window `width` x `height` CSS pixels (a phone with mobile=True)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=scale,
            mobile=mobile,
        )

    async def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """Write a PNG of the page (all of it, or what the viewport shows) to `path`."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        result = await self.send("Page.captureScreenshot", **params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.reader, 5)


def _devtools_port(profile: Path, proc: subprocess.Popen, log_path: Path) -> int:
    """The port chromium wrote to <profile>/DevToolsActivePort (it chose it: port 0)."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError, ValueError, IndexError):
            lines = marker.read_text().splitlines()
            if len(lines) >= 2:
                return int(lines[0])
        output = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        if proc.poll() is not None:
            pytest.fail(f"chromium exited with {proc.returncode}:\n{output}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"chromium wrote no {marker} in {START_TIMEOUT}s:\n{output}", pytrace=False)
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM chromium's process group, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.asynccontextmanager
async def launch_browser(workdir: Path) -> AsyncIterator[Page]:
    """Headless chromium with a fresh profile under `workdir`; yields its first page."""
    binary = chromium_binary()
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    # A reused profile holds the port of a browser long gone: wait for this one's.
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    log_path = workdir / "chromium.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # tests run as root
                "--disable-gpu",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--no-first-run",
                "--no-default-browser-check",
                "--no-proxy-server",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--force-color-profile=srgb",
                "about:blank",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: renderers and all are killed
        )
    session: aiohttp.ClientSession | None = None
    page: Page | None = None
    try:
        port = await asyncio.to_thread(_devtools_port, profile, proc, log_path)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=COMMAND_TIMEOUT))
        page_ws = await _page_target(session, port)
        ws = await session.ws_connect(page_ws, max_msg_size=0, heartbeat=None)
        page = Page(ws)
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        yield page
    finally:
        if page is not None:
            await page.close()
        if session is not None:
            await session.close()
        await asyncio.to_thread(_kill_group, proc)


async def _page_target(session: aiohttp.ClientSession, port: int) -> str:
    """The websocket URL of a page target (the about:blank chromium opened)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        for target in targets:
            if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                return target["webSocketDebuggerUrl"]
        if time.monotonic() > deadline:
            pytest.fail(f"chromium shows no page target: {targets}", pytrace=False)
        await asyncio.sleep(0.1)
