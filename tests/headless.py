"""Headless Chromium driven over the DevTools protocol, for the dashboard's browser test and
benchmark (``benchmarks/dashboard.py``). Debian's ``chromium`` package; no Python package
beyond aiohttp (a dependency already) for the protocol's websocket.

    browser = Chromium.start(tmp)           # a process, its own throwaway profile
    async with browser.page() as page:      # a tab
        await page.goto(url)
        await page.wait_for("document.documentElement.dataset.state === 'ready'")
        texts = await page.evaluate("[...document.querySelectorAll('td')].map(e => e.textContent)")
        await page.screenshot(tmp / "page.png")
    browser.close()

A page records the dialogs it opened (``dialogs``: an ``alert()`` an injected script ran),
uncaught exceptions (``exceptions``), console errors and CSP violations (``console``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = next(
    (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
)
NO_CHROMIUM = (
    "needs headless Chromium (Debian: apt-get install -y chromium); .ci/run installs it, and "
    "with CARBON_ROUTER_REQUIRE_BROWSER=1 a missing one is an error, not a skip"
)


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools command failed."""


class Chromium:
    """A headless Chromium process with a fresh profile and a DevTools port on loopback."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, profile: Path) -> None:
        self.proc, self.port, self.profile = proc, port, profile

    @classmethod
    def start(cls, workdir: Path, *, timeout_s: float = 30.0) -> Chromium:
        if CHROMIUM is None:
            raise BrowserError(NO_CHROMIUM)
        profile = workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        args = [
            CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--disable-component-update", "--disable-default-apps", "--mute-audio",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank",
        ]  # fmt: skip
        if os.geteuid() == 0:  # Chromium's sandbox refuses root (CI containers run as root)
            args.insert(1, "--no-sandbox")
        with (workdir / "chromium.log").open("wb") as log:  # the child keeps its own handle
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise BrowserError(
                    f"chromium did not open its DevTools port within {timeout_s} s; its output is "
                    f"in {workdir / 'chromium.log'}"
                )
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        return cls(proc, port, profile)

    @contextlib.asynccontextmanager
    async def page(self, *, width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
        """A new tab, closed on exit."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            base = f"http://127.0.0.1:{self.port}"
            async with http.put(f"{base}/json/new?about:blank") as r:
                target = await r.json()
            ws = await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20)
            page = Page(ws)
            try:
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                await page.send("Network.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=width, height=height, deviceScaleFactor=1, mobile=False,
                )  # fmt: skip
                yield page
            finally:
                await page.close()
                async with http.get(f"{base}/json/close/{target['id']}"):
                    pass

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Page:
    """One tab over its DevTools websocket: commands and the events worth asserting on."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.dialogs: list[str] = []
        self.exceptions: list[str] = []
        self.console: list[str] = []  # errors and warnings, CSP violations among them
        self.requests: list[str] = []  # every URL the page asked for
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            if "id" in data:
                fut = self._waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.javascriptDialogOpening":
                self.dialogs.append(params.get("message", ""))
                asyncio.get_running_loop().create_task(
                    self.send("Page.handleJavaScriptDialog", accept=False)
                )
            elif method == "Runtime.exceptionThrown":
                self.exceptions.append(str(params.get("exceptionDetails", {})))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "warning",
            ):
                self.console.append(str(params.get("args")))
            elif method == "Log.entryAdded":
                self.console.append(str(params.get("entry", {}).get("text")))
            elif method == "Network.requestWillBeSent":
                self.requests.append(params.get("request", {}).get("url", ""))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        answer = await asyncio.wait_for(fut, 30)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def goto(self, url: str) -> None:
        await self.send("Log.enable")
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20.0, poll_s: float = 0.01) -> Any:
        """The value of ``expression`` once it is truthy; BrowserError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(BrowserError):  # the page may be between documents
                value = await self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} still false after {timeout_s} s")
            await asyncio.sleep(poll_s)

    async def screenshot(self, path: Path) -> bytes:
        """The whole page (beyond the window too) as PNG, written to ``path``."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = await self.send(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )  # fmt: skip
        png = base64.b64decode(shot["data"])
        path.write_bytes(png)
        return png

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        for fut in self._waiting.values():
            fut.cancel()
