"""The status page at GET /: what it serves over HTTP, and what a real browser makes of it.

The HTTP tests run on virtual time like the rest of the suite. The browser tests cannot (the
browser lives in real time): each is bounded by ``trio.fail_after``, polls the DOM with a
deadline, and skips, saying why, where headless Chromium cannot be had (see
status_page_support). ``STATUS_PAGE_SCREENSHOT=path`` also writes the lost-link test's
screenshot there (docs/status-page.png is made that way).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deribit_keeper import __version__, status_page
from deribit_keeper.config import AccountConfig, HttpConfig
from deribit_keeper.session import SessionState
from deribit_keeper.shard import Shard
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import SECRETS, SIM_ACCOUNTS, Exposure, account_config, keeper_config
from .gateway_support import (
    Client,
    gateway_account,
    gateway_config,
    local_client,
    ready_and_listening,
    until,
    upstream,
)
from .status_page_support import (
    HOSTILE,
    ROWS_JS,
    Browser,
    BrowserUnavailable,
    Page,
    console_problems,
    hostile_document,
    navigate,
    open_page,
    read_page,
    rows_of,
    start_chromium,
)
from .test_http import http, idle_keeper, serve

BROWSER_TEST_S = 30  # the whole of a browser test, Chromium's work included
ROW_CHANGE_S = 10  # a lost link must show within this (the page re-fetches every 2 s)
ORDERS_CHANNEL = "user.orders.BTC-PERPETUAL.raw"
# Tags the page is made of: anything else in it came from data.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "span", "main"}
PAGE_TAGS |= {"table", "thead", "tbody", "tr", "th", "td", "div", "ul", "li", "b", "noscript"}
PAGE_TAGS |= {"p", "script"}


async def keeper_with_page(
    nursery: trio.Nursery, *accounts: AccountConfig, shard: Shard | None = None
) -> Keeper:
    """A running Keeper with its operations endpoint, once every account is ready."""
    config = dataclasses.replace(keeper_config(*accounts), http=HttpConfig("127.0.0.1", 0))
    keeper = Keeper(config, rng=random.Random(7), environ={}, shard=shard)
    await nursery.start(partial(keeper.run, handle_signals=False))
    await until(keeper, ready_and_listening(keeper))
    return keeper


def desk(sim: Simulator) -> tuple[AccountConfig, ...]:
    """Three accounts as a desk might name them: ``main`` with a gateway (local COD on)."""
    main = gateway_account(sim, "main", gateway_config(cancel_on_disconnect=True))
    hedge = account_config(sim, "hedge", cancel_on_disconnect="account")
    options = dataclasses.replace(account_config(sim, "third"), name="options-mm")
    return main, hedge, options


@asynccontextmanager
async def trading_engine(keeper: Keeper) -> AsyncIterator[Client]:
    """An engine on main's gateway: authenticated, one resting order, one subscription."""
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        assert await engine.result("private/subscribe", {"channels": [ORDERS_CHANNEL]})
        await engine.buy()
        yield engine


async def lose_hedge(sim: Simulator) -> None:
    """Drop hedge's upstream link and refuse its reconnects, so it stays down a while."""
    sim.refuse_handshakes(50, 503)
    await sim.drop(upstream(sim, "hedge"), abrupt=True)


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# ---- over plain HTTP ------------------------------------------------------------------------


async def test_the_page_is_one_html_answer_under_a_strict_csp(nursery: trio.Nursery) -> None:
    """GET / is HTML whose CSP allows only its own inline style and script, by hash, and
    loads nothing from anywhere; HEAD / has the same headers, other methods get 405."""
    port = await serve(nursery, idle_keeper())
    page = await http(port, "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert (page.headers["cache-control"], page.headers["x-content-type-options"]) == (
        "no-store",
        "nosniff",
    )
    assert page.headers["referrer-policy"] == "no-referrer"
    text = page.body.decode()
    [script] = re.findall(r"<script>(.*?)</script>", text, re.S)
    [style] = re.findall(r"<style>(.*?)</style>", text, re.S)
    directives = page.headers["content-security-policy"].split("; ")
    policy = dict(directive.partition(" ")[::2] for directive in directives)
    assert policy == {
        "default-src": "'none'",
        "script-src": sha256_source(script),
        "style-src": sha256_source(style),
        "connect-src": "'self'",
        "img-src": "'none'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    assert not re.search(r"\b(src|href)=|url\(|@import|//[a-z]", text, re.I)  # nothing external
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "document.write" not in script and "eval(" not in script
    assert "no accounts in this keeper" in text

    head = await http(port, "/", "HEAD")
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-security-policy"] == page.headers["content-security-policy"]
    refused = await http(port, "/", "POST")
    assert (refused.status, refused.headers["allow"]) == (405, "GET, HEAD")


async def test_every_account_has_a_row_and_the_header_counts_them(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Each account's row shows its state word, COD, reconnects, last error and gateway links;
    the header shows version, uptime, shard and how many are ready; /status carries them."""
    keeper = await keeper_with_page(nursery, *desk(sim), shard=Shard(0, 1))
    assert keeper.http_port is not None
    async with trading_engine(keeper):
        await trio.sleep(90)  # uptime and "confirmed ... ago" worth reading
        await lose_hedge(sim)
        hedge_session = keeper.sessions["hedge"]

        def refused_and_waiting() -> bool:
            error = hedge_session.last_error
            waiting = hedge_session.state is SessionState.BACKOFF
            return waiting and error is not None and error[0] == "handshake_rejected"

        await until(keeper, refused_and_waiting)
        status = (await http(keeper.http_port, "/status")).json()
        view = read_page((await http(keeper.http_port, "/")).body)

    assert (status["shard"], status["ready"], status["total"]) == ("0/1", 2, 3)
    assert status["now"].endswith("Z") and status["uptime_s"] >= 90
    assert list(view.rows) == ["main", "hedge", "options-mm"]
    assert {name: row["state"] for name, row in view.rows.items()} == {
        "main": "ready",
        "hedge": "backoff",
        "options-mm": "ready",
    }
    main, hedge = view.rows["main"], view.rows["hedge"]
    # The sessions' wall clock is the real one, which autojump does not move.
    assert re.fullmatch(r"connectionconfirmed \d+ s ago", main["cod"]), main["cod"]
    assert hedge["cod"] == "accountnot confirmed"
    assert (main["reconnects"], hedge["reconnects"]) == ("0", str(hedge_session.reconnects))
    assert re.fullmatch(r"\d+\.\d s", main["quiet"]) and hedge["quiet"] == status_page.DASH
    assert main["error"] == status_page.DASH
    assert re.fullmatch(r"handshake_rejected\d+ s ago", hedge["error"]), hedge["error"]
    gateway_port = keeper.gateways["main"].port
    link = f"engine · local COD on · 1 open order1 subscription: {ORDERS_CHANNEL}"
    assert main["gateway"] == f"on 127.0.0.1:{gateway_port}{link}"
    assert hedge["gateway"] == status_page.DASH
    assert view.header[:2] == ["deribit-keeper", "2 of 3 ready"]
    assert view.header[2:5] == [f"version {__version__}", "up 1 min", "shard 0/1"]
    assert re.fullmatch(r"as of \d\d:\d\d:\d\d UTC", view.header[5])


async def test_names_and_errors_are_text_never_markup(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Markup and quotes in an account name (served) or in any other value (rendered) come
    out as the same text, with no element or attribute of their own."""
    hostile = dataclasses.replace(account_config(sim, "main"), name=HOSTILE)
    keeper = await keeper_with_page(nursery, hostile)
    assert keeper.http_port is not None
    served = (await http(keeper.http_port, "/")).body
    view = read_page(served)
    assert list(view.rows) == [HOSTILE]
    assert view.rows[HOSTILE]["name"] == HOSTILE
    assert HOSTILE not in served.decode()

    rendered = status_page.render(hostile_document("2025-01-02T03:04:05.678Z"))
    view = read_page(rendered)
    assert set(view.tags) <= PAGE_TAGS and view.tags.count("script") == 1
    assert list(view.rows) == [HOSTILE, "main"]
    row = view.rows[HOSTILE]
    assert (row["name"], row["state"], row["cod"]) == (HOSTILE, HOSTILE, HOSTILE + "not confirmed")
    assert row["error"] == HOSTILE + "0 s ago"
    assert row["gateway"].startswith(f"{HOSTILE} not listening{HOSTILE} · local COD on")
    assert f"{HOSTILE} over HTTP" in row["gateway"]
    assert view.header[2:6] == ["stopping", f"version {HOSTILE}", "up 5 s", f"shard {HOSTILE}"]
    assert HOSTILE not in rendered.decode()
    assert view.rows["main"] == {  # the other branches, which the browser test compares too
        "name": "main",
        "state": "ready",
        "cod": "connectionconfirmed 2 h 4 min ago",
        "quiet": "1.3 s",
        "reconnects": "0",
        "error": status_page.DASH,
        "gateway": "on [::1]:9601unauthenticated · local COD off · 0 open ordersno subscriptions",
    }


async def test_the_page_shows_no_secret_or_token(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, exposure: Exposure
) -> None:
    """After token refreshes, a reconnect and a local link's auth, the page holds no secret,
    Deribit token or local token, and it is among what the suite's leak check searches."""
    sim = Simulator(list(SIM_ACCOUNTS), token_ttl_s=60)
    await nursery.start(sim.serve, 0)
    keeper = await keeper_with_page(nursery, *desk(sim))
    assert keeper.http_port is not None
    async with trading_engine(keeper):
        await trio.sleep(130)  # two refreshes an account
        await sim.drop(upstream(sim, "hedge"), abrupt=True)
        await until(keeper, lambda: keeper.sessions["hedge"].reconnects == 1)
        page = (await http(keeper.http_port, "/")).body.decode()
    assert len(sim.issued_tokens) >= 12 and exposure.local_tokens
    for forbidden in (*SECRETS, *sim.issued_tokens, *exposure.local_tokens):
        assert forbidden not in page
    assert any(page in served for served in exposure.served)  # conftest checks it after the test


# ---- in a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One headless Chromium for this module's browser tests; skipped, saying why, without."""
    try:
        started = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    except BrowserUnavailable as why:
        pytest.skip(f"no headless Chromium, so no real-browser test: {why}")
    yield started
    started.close()


async def rows(page: Page) -> dict[str, dict[str, str]]:
    return rows_of(await page.evaluate(ROWS_JS))


async def test_a_browser_shows_every_account_and_sees_a_link_lost(
    nursery: trio.Nursery, sim: Simulator, browser: Browser, tmp_path: Path
) -> None:
    """In headless Chromium the page lists every account as ready, with main's gateway link;
    a lost upstream link shows in its row within seconds, with no reload and no CSP report."""
    with trio.fail_after(BROWSER_TEST_S):
        keeper = await keeper_with_page(nursery, *desk(sim))
        async with trading_engine(keeper), open_page(browser.url) as page:
            await navigate(page, f"http://127.0.0.1:{keeper.http_port}/")
            shown = await rows(page)
            assert {name: row["state"] for name, row in shown.items()} == {
                "main": "ready",
                "hedge": "ready",
                "options-mm": "ready",
            }
            assert "engine · local COD on · 1 open order" in shown["main"]["gateway"]
            colour = "getComputedStyle(document.querySelector('td.state .badge')).backgroundColor"
            assert await page.evaluate(colour) == "rgb(218, 251, 225)"  # the hashed style applies

            await lose_hedge(sim)
            lost_at = trio.current_time()
            changed = (
                "(r => r.state !== 'ready' && r.error.startsWith('handshake_rejected'))"
                "(JSON.parse(" + ROWS_JS + ").hedge)"
            )
            await page.until(changed, within=ROW_CHANGE_S)
            took = trio.current_time() - lost_at
            shown = await rows(page)
            assert shown["hedge"]["reconnects"] != "0"
            assert [shown["main"]["state"], shown["options-mm"]["state"]] == ["ready", "ready"]
            header = await page.evaluate("document.querySelector('header').textContent")
            assert "2 of 3 ready" in header
            assert console_problems(page) == []
            png = await page.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    await trio.Path(tmp_path / "status-page.png").write_bytes(png)  # the test's artifact
    if os.environ.get("STATUS_PAGE_SCREENSHOT"):
        wanted = trio.Path(os.environ["STATUS_PAGE_SCREENSHOT"])
        await wanted.parent.mkdir(parents=True, exist_ok=True)
        await wanted.write_bytes(png)
    print(f"status page: the lost link showed after {took:.1f} s; {tmp_path / 'status-page.png'}")


async def test_the_script_shows_hostile_data_as_text_and_says_when_unreachable(
    nursery: trio.Nursery, browser: Browser
) -> None:
    """The script's own rendering of /status keeps markup in values as text (nothing runs,
    no element appears) and reads as the server's does; a failed fetch marks the page stale
    instead of blanking it."""
    with trio.fail_after(BROWSER_TEST_S):
        port = await serve(nursery, idle_keeper())
        async with open_page(browser.url) as page:
            await page.call("Fetch.enable", patterns=[{"urlPattern": "*/status"}])
            await navigate(page, f"http://127.0.0.1:{port}/")
            paused = await page.next_event("Fetch.requestPaused")
            document = hostile_document("2025-01-02T03:04:05.678Z")
            body = json.dumps(document).encode()
            await page.call(
                "Fetch.fulfillRequest",
                requestId=paused["params"]["requestId"],
                responseCode=200,
                responseHeaders=[{"name": "Content-Type", "value": "application/json"}],
                body=base64.b64encode(body).decode(),
            )
            shown = rows_of(await page.until(f"(r => r.includes('onerror') && r)({ROWS_JS})", 5))
            assert list(shown) == [HOSTILE, "main"]
            row: dict[str, Any] = shown[HOSTILE]
            assert (row["name"], row["state"]) == (HOSTILE, HOSTILE)
            assert row["error"] == HOSTILE + "0 s ago"
            assert f"{HOSTILE} over HTTP" in row["gateway"]
            server = read_page(status_page.render(document))
            assert shown == server.rows  # the script and the server render the same table
            header = await page.evaluate("document.querySelector('header').textContent")
            assert header == "".join(server.header)
            planted = "[document.scripts.length, document.images.length, window.pwned ?? null]"
            assert await page.evaluate(planted) == [1, 0, None]
            tags = "[...new Set([...document.querySelectorAll('*')].map(e => e.localName))]"
            assert set(await page.evaluate(tags)) <= PAGE_TAGS
            assert console_problems(page) == []

            paused = await page.next_event("Fetch.requestPaused")
            await page.call(
                "Fetch.failRequest",
                requestId=paused["params"]["requestId"],
                errorReason="ConnectionRefused",
            )
            stale = "document.body.classList.contains('stale') && "
            stale += "document.getElementById('updated').textContent"
            assert (await page.until(stale, 5)).startswith("keeper unreachable")
            assert list(await rows(page)) == [HOSTILE, "main"]  # the last answer stays shown
