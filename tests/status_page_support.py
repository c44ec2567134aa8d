"""What the status page tests share: a reader of the page's HTML, and a headless Chromium driven
over the Chrome DevTools Protocol with trio-websocket, so the browser test adds no dependency.

The browser is Debian's ``chromium``. ``start_chromium`` starts it on a DevTools port of its
own choosing (``--remote-debugging-port=0``), reads the port from the line it writes on stderr,
and raises ``BrowserUnavailable`` (the tests skip with its message) when it is not installed or
does not start. ``open_page`` is one CDP connection to the browser with a fresh tab attached to it
("flat" sessions: one WebSocket carries the browser's and the tab's messages).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Final

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

CHROMIUM_CANDIDATES: Final = ("chromium", "/usr/bin/chromium")
START_TIMEOUT_S: Final = 20  # a cold start on a busy 2-core CI machine takes a few seconds
CALL_TIMEOUT_S: Final = 10
WINDOW: Final = (1000, 400)  # the screenshot's size, small enough to commit
_LISTENING: Final = re.compile(r"DevTools listening on (ws://\S+)")


# ---- the page as HTML -----------------------------------------------------------------------


@dataclass
class PageView:
    """What a reader of the served HTML sees: text per element, with entities decoded."""

    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # account -> cell class -> text
    header: list[str] = field(default_factory=list)  # the header's texts, in order
    tags: list[str] = field(default_factory=list)  # every start tag, in order
    scripts: list[str] = field(default_factory=list)  # the text of every <script>


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.view = PageView()
        self._row: str | None = None
        self._cell: str | None = None
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.view.tags.append(tag)
        self._in.append(tag)
        if tag == "tr" and found.get("data-account") is not None:
            self._row = found["data-account"]
            self.view.rows[self._row or ""] = {}
        elif tag == "td" and self._row is not None:
            self._cell = (found.get("class") or "").split()[-1]
            self.view.rows[self._row][self._cell] = ""
        elif tag == "script":
            self.view.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if self._in and self._in[-1] == tag:
            self._in.pop()
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if "script" in self._in:
            self.view.scripts[-1] += data
        elif self._row is not None and self._cell is not None:
            self.view.rows[self._row][self._cell] += data
        elif "header" in self._in and data.strip():
            self.view.header.append(data)


def read_page(body: bytes) -> PageView:
    """The rows, header texts, tags and scripts of a status page."""
    reader = _Reader()
    reader.feed(body.decode())
    reader.close()
    return reader.view


# ---- the browser ----------------------------------------------------------------------------


class BrowserUnavailable(Exception):
    """Chromium is not installed here, or did not start: the message says which and why."""


class CdpError(Exception):
    """The browser answered a DevTools command with an error."""


def chromium_path() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found is not None:
            return found
    return None


@dataclass
class Browser:
    """A running headless Chromium: its process and its browser-wide DevTools WebSocket URL."""

    process: subprocess.Popen[bytes]
    url: str
    stderr: list[str]  # its last lines, for a message
    reader: threading.Thread

    def close(self) -> None:
        """TERM the browser's process group (it leads it), KILL it if it lingers: no renderer
        outlives the tests. Then the stderr reader sees EOF and the pipe is closed."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break  # the whole group has ended
            try:
                self.process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        self.reader.join(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()


def start_chromium(profile: Path) -> Browser:
    """Start a headless Chromium on a DevTools port it picks itself, and say where it listens.

    The port is read from the line Chromium writes on stderr ("DevTools listening on ws://...")
    by a thread that goes on draining stderr afterwards, since a full pipe would stall the
    browser. Synchronous, for a pytest fixture: a skip raised there keeps its message.

    Raises:
        BrowserUnavailable: no ``chromium`` on PATH, or it could not be run, exited, or said
            nothing for ``START_TIMEOUT_S`` (the message has the tail of its stderr).
    """
    path = chromium_path()
    if path is None:
        raise BrowserUnavailable("chromium is not installed (Debian: apt-get install chromium)")
    command = [
        path,
        "--headless",
        "--no-sandbox",  # CI runs as root in a container, where the sandbox cannot start
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MB
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so close() ends its children too
        )
    except OSError as error:
        raise BrowserUnavailable(f"{path} could not be run: {error}") from None
    lines: list[str] = []
    found: list[str] = []
    listening = threading.Event()

    def read_stderr() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            lines[:] = [*lines[-19:], line]
            match = _LISTENING.search(line)
            if match is not None and not found:
                found.append(match.group(1))
                listening.set()
        listening.set()  # stderr closed: the browser has exited

    reader = threading.Thread(target=read_stderr, name="chromium-stderr", daemon=True)
    reader.start()
    browser = Browser(process, "", lines, reader)
    if not listening.wait(START_TIMEOUT_S) or not found:
        exited = process.poll()
        how = f"said nothing for {START_TIMEOUT_S} s" if exited is None else f"exited ({exited})"
        browser.close()
        tail = " | ".join(lines[-3:]) or "(no output)"
        raise BrowserUnavailable(f"{path} {how} before DevTools listened: {tail}")
    browser.url = found[0]
    return browser


@dataclass
class Page:
    """One browser tab, driven over CDP: commands, events, and a few conveniences."""

    ws: WebSocketConnection
    session_id: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = field(default_factory=dict)
    _event_seen: trio.Event = field(default_factory=trio.Event)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command to the tab (to the browser before attaching); return its result."""
        number = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[number] = send
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if self.session_id:
            message["sessionId"] = self.session_id
        await self.ws.send_message(json.dumps(message))
        with trio.fail_after(CALL_TIMEOUT_S):
            answer = await receive.receive()
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, within: float) -> Any:
        """Evaluate ``expression`` every 0.1 s until it is truthy; return that value.

        Polling, since a page's DOM changes send no CDP event worth waiting on here; bounded
        by ``within`` seconds (trio.TooSlowError names the expression).
        """
        with trio.move_on_after(within):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await trio.sleep(0.1)
        raise trio.TooSlowError(f"{expression!r} still false after {within} s")

    async def next_event(self, method: str) -> dict[str, Any]:
        """The first event ``method`` not yet taken, waiting for it if need be."""
        while True:
            for event in self.events:
                if event["method"] == method:
                    self.events.remove(event)
                    return event
            await self._event_seen.wait()

    async def screenshot(self, below: str = "main") -> bytes:
        """A PNG of the viewport's top, down to just below the element ``below`` (no blank
        band under a short page)."""
        bottom = await self.evaluate(
            f"document.querySelector({below!r}).getBoundingClientRect().bottom"
        )
        height = min(WINDOW[1], int(bottom) + 16)
        clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": height, "scale": 1}
        result = await self.call("Page.captureScreenshot", format="png", clip=clip)
        return base64.b64decode(result["data"])

    async def read(self) -> None:
        """Route answers to their callers and keep events, until the connection ends."""
        while True:
            message = json.loads(await self.ws.get_message())
            if "id" in message:
                waiting = self._waiting.pop(message["id"], None)
                if waiting is not None:
                    waiting.send_nowait(message)
            else:
                self.events.append(message)
                self._event_seen.set()
                self._event_seen = trio.Event()


@asynccontextmanager
async def open_page(browser_url: str) -> AsyncIterator[Page]:
    """A new tab of the browser at ``browser_url``, with the Page, Runtime and Log domains on
    and a ``WINDOW``-sized viewport."""
    async with (
        open_websocket_url(browser_url, max_message_size=32 * 1024 * 1024) as ws,
        trio.open_nursery() as nursery,
    ):
        page = Page(ws)
        nursery.start_soon(page.read)
        target = await page.call("Target.createTarget", url="about:blank")
        attached = await page.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page.session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await page.call(f"{domain}.enable")
        # The viewport itself, not the window: a window's chrome differs between versions.
        width, height = WINDOW
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        await page.call("Emulation.setDeviceMetricsOverride", **metrics)
        try:
            yield page
        finally:
            nursery.cancel_scope.cancel()


async def navigate(page: Page, url: str) -> None:
    """Load ``url`` in the tab and return once its load event has fired."""
    page.events[:] = [e for e in page.events if e["method"] != "Page.loadEventFired"]
    await page.call("Page.navigate", url=url)
    await page.next_event("Page.loadEventFired")


def console_problems(page: Page) -> list[str]:
    """The page's console errors and CSP violations so far (a blocked script, say)."""
    found = []
    for event in page.events:
        if event["method"] == "Log.entryAdded":
            entry = event["params"]["entry"]
            if entry["level"] == "error" and "favicon" not in entry.get("url", ""):
                found.append(f"{entry['source']}: {entry['text']}")
        elif event["method"] == "Runtime.exceptionThrown":
            found.append(str(event["params"]["exceptionDetails"]))
    return found


# The DOM as the tests read it: per account row, its state word and each cell's text.
ROWS_JS: Final = """JSON.stringify(Object.fromEntries([...document.querySelectorAll(
  "#accounts tr[data-account]")].map(tr => [tr.dataset.account, Object.fromEntries(
  [...tr.cells].map(td => [td.classList[td.classList.length - 1], td.textContent]))])))"""


def rows_of(value: Any) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = json.loads(value)
    return rows


# Markup and quotes in every string of a status document: each must come out as text.
HOSTILE: Final = """<img src=x onerror="window.pwned=1">"&'<script>window.pwned=2</script>"""


def hostile_document(now: str) -> dict[str, Any]:
    """A /status document whose every string a keeper could show is ``HOSTILE``-laden, in the
    account of that name; account ``main`` beside it takes the page's other branches (ready,
    COD confirmed, a gateway listening, a link with subscriptions, no error)."""
    return {
        "version": HOSTILE,
        "alive": False,
        "ready": 1,
        "total": 2,
        "now": now,
        "uptime_s": 5.0,
        "shard": HOSTILE,
        "accounts": {
            HOSTILE: {
                "state": HOSTILE,
                "ready": False,
                "cod_scope": HOSTILE,
                "cod_confirmed_at": None,
                "connected_since": None,
                "seconds_since_last_message": None,
                "reconnects": 3,
                "last_error": {"reason": HOSTILE, "at": now},
                "gateway": {
                    "listen": HOSTILE,
                    "port": None,
                    "listening": False,
                    "links": [
                        {
                            "id": 1,
                            "client_id": HOSTILE,
                            "peer": HOSTILE,
                            "connected_since": now,
                            "cod": True,
                            "open_orders": 2,
                            "subscriptions": [HOSTILE],
                        }
                    ],
                    "http_open_orders": {HOSTILE: 1},
                    "upstream_channels": [HOSTILE],
                },
            },
            "main": {
                "state": "ready",
                "ready": True,
                "cod_scope": "connection",
                "cod_confirmed_at": "2025-01-02T01:00:00.000Z",
                "connected_since": "2025-01-01T00:00:00.000Z",
                "seconds_since_last_message": 1.25,
                "reconnects": 0,
                "last_error": None,
                "gateway": {
                    "listen": "[::1]:0",
                    "port": 9601,
                    "listening": True,
                    "links": [
                        {
                            "id": 2,
                            "client_id": None,
                            "peer": "[::1]:50000",
                            "connected_since": now,
                            "cod": False,
                            "open_orders": 0,
                            "subscriptions": [],
                        }
                    ],
                    "http_open_orders": {},
                    "upstream_channels": [],
                },
            },
        },
    }
