"""Review of the gateway: defects that would cost a trader money, each kept by a test.

Each test below its section comment failed on c48fb4b (the gateway as first reviewed) and
passes since a85b032 ("Gateway: fix what review found"); the comment names the defect. The
surrogate test guards a regression seen in a draft of those fixes (raw UTF-8 upstream frames),
and the layering test keeps the architecture's import rules (../shared/architecture.md).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import deribit_keeper
from deribit_keeper.simulator import Simulator

from .conftest import RESEARCH, LogLines, keeper_config
from .gateway_support import (
    Client,
    gateway_account,
    local_client,
    ready_and_listening,
    run_keeper,
    until,
    upstream,
)

PACKAGE = Path(deribit_keeper.__file__).parent
BTC = {"currency": "BTC"}


# ---- import layering ----------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = PACKAGE.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _keeper_imports(path: Path) -> set[str]:
    """Every deribit_keeper module ``path`` imports (TYPE_CHECKING imports included), by its
    dotted name; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base]
            targets += [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
        else:
            continue
        found.update(t for t in targets if t == "deribit_keeper" or t.startswith("deribit_keeper."))
    return found


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_import_layering_the_architecture_demands() -> None:
    """(a) the simulator imports of the keeper only protocol, signatures and jsonrpc; (b) only
    the simulator itself, cli and demo import the simulator; (c) the gateway imports none of
    supervisor, http, metrics, systemd, cli, demo; (d) session, rpc and auth never import the
    gateway."""
    k = "deribit_keeper"
    shared = {f"{k}.protocol", f"{k}.signatures", f"{k}.jsonrpc", f"{k}.rest"}
    above = ("supervisor", "http", "metrics", "systemd", "cli", "demo")
    forbidden_to_gateway = [f"{k}.{m}" for m in above]
    imports = {_module_name(p): _keeper_imports(p) for p in PACKAGE.rglob("*.py")}
    assert f"{k}.gateway.link" in imports and f"{k}.simulator.server" in imports
    broken: list[str] = []
    for module, imported in sorted(imports.items()):
        for target in sorted(imported):
            if _within(module, f"{k}.simulator"):
                if not _within(target, f"{k}.simulator") and target not in shared:
                    broken.append(f"(a) {module} imports {target}")
            elif _within(target, f"{k}.simulator") and module not in (f"{k}.cli", f"{k}.demo"):
                broken.append(f"(b) {module} imports {target}")
            if _within(module, f"{k}.gateway") and _within(target, *forbidden_to_gateway):
                broken.append(f"(c) {module} imports {target}")
            if module in (f"{k}.session", f"{k}.rpc", f"{k}.auth") and _within(
                target, f"{k}.gateway"
            ):
                broken.append(f"(d) {module} imports {target}")
    assert broken == []


# ---- helpers ---------------------------------------------------------------------------------


def open_ids(sim: Simulator) -> list[str]:
    """The ids of the main account's open orders on the simulator."""
    return [o["order_id"] for o in sim.open_orders("main-id")]


async def answer_or_close(client: Client, request_id: int) -> None:
    await client.wait_for(
        lambda: client.answer(request_id) is not None or client.closed is not None
    )


# ---- (2) one local client kills the upstream link for every link -----------------------------


async def test_a_request_that_grows_past_32_kb_upstream_does_not_cost_the_upstream_link(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """An unauthenticated client sends a public request of 24 kB of UTF-8 text ("é" is 2 bytes;
    json.dumps makes it the 6-byte ``\\u00e9``). It may get an error, but the account's
    upstream connection, the other link and its order must not notice."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    link = upstream(sim)
    async with local_client(gateway) as bystander, local_client(gateway) as careless:
        await bystander.auth(RESEARCH)
        kept = await bystander.buy()
        params = {"currency": "BTC", "note": "é" * 12_000}
        frame = {"jsonrpc": "2.0", "id": 7, "method": "public/get_instruments", "params": params}
        raw = json.dumps(frame, ensure_ascii=False)
        assert len(raw.encode()) < 32 * 1024  # within the limit the gateway itself enforces
        await careless.ws.send_message(raw)
        with trio.fail_after(5):
            await answer_or_close(careless, 7)
        await trio.sleep(2)
        assert bystander.closed is None
    assert link.open and upstream(sim) is link
    assert [o["order_id"] for o in sim.open_orders("main-id")] == [kept["order_id"]]


# ---- (1) one link's local COD cancels another link's order -----------------------------------


async def test_editing_another_links_order_does_not_make_it_yours_for_local_cod(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """research places an order; engine (local COD on) moves its price, as a risk process
    might, then crashes: only engine's own orders may be cancelled, research's stays."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as research:
        await research.auth(RESEARCH)
        theirs = await research.buy(price=41_000)
        async with local_client(gateway) as engine:
            await engine.auth()
            assert await engine.result("private/enable_cancel_on_disconnect") == "ok"
            mine = await engine.buy(price=39_000)
            edited = await engine.result(
                "private/edit", {"order_id": theirs["order_id"], "amount": 10, "price": 40_500}
            )
            assert edited["order"]["order_state"] == "open"
            await engine.abort()
            await until(keeper, lambda: bool(log_lines.events("gateway.cod_fired")))
        await trio.sleep(2)
        assert research.closed is None
    still_open = [o["order_id"] for o in sim.open_orders("main-id")]
    assert still_open == [theirs["order_id"]], f"engine's own {mine['order_id']} only"


# ---- (1)+(2) an exception escaping a link skips local COD ------------------------------------

NOW_MS = object()  # replaced by the wall clock in ms when the request is sent
CRASHING_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    # get_number: float(10**400) raises OverflowError, not RpcFault.
    "huge_heartbeat_interval": ("public/set_heartbeat", {"interval": 10**400}),
    # _check_secret: a lone surrogate (valid JSON "\ud800") cannot be encoded: UnicodeEncodeError.
    "surrogate_secret": (
        "public/auth",
        {"grant_type": "client_credentials", "client_id": "engine", "client_secret": "\ud800"},
    ),
    # client_signature: the nonce goes through protocol.sign, which encodes it.
    "surrogate_nonce": (
        "public/auth",
        {
            "grant_type": "client_signature",
            "client_id": "engine",
            "timestamp": NOW_MS,
            "nonce": "\ud800",
            "signature": "00",
            "data": "",
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CRASHING_REQUESTS))
async def test_a_request_the_gateway_cannot_handle_never_leaves_a_dead_links_orders_open(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    case: str,
) -> None:
    """A bad request gets an error answer and the link stays; if the link must end instead,
    it ended other than by logout with local COD on, so its orders are cancelled within 1 s."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    method, params = CRASHING_REQUESTS[case]
    params = {k: int(time.time() * 1000) if v is NOW_MS else v for k, v in params.items()}
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        assert await engine.result("private/enable_cancel_on_disconnect") == "ok"
        await engine.buy()
        request_id = engine.next_id()
        await engine.send(method, params, id=request_id)
        with trio.fail_after(5):
            await answer_or_close(engine, request_id)
        if engine.closed is None:
            answer = engine.answer(request_id)
            assert answer is not None and "error" in answer
            return
    with trio.fail_after(1):
        await sim.wait_for(lambda: sim.open_orders("main-id") == [])
    assert log_lines.events("gateway.client_disconnected", client_id="engine")


# ---- (1) one slow order answer disables local COD for every order of the link ----------------


async def test_a_slow_order_answer_does_not_stop_local_cod_cancelling_the_links_orders(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Two resting orders, a third buy whose answer Deribit takes 8 s to send (request_timeout
    is 5 s), then the engine crashes: all three end cancelled and local COD is logged."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        assert await engine.result("private/enable_cancel_on_disconnect") == "ok"
        for price in (40_000, 39_000):
            await engine.buy(price=price)
        sim.delay_next("private/buy", 8.0)
        params = {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 38_000}
        await engine.send("private/buy", params, id=engine.next_id())
        await sim.wait_for(
            lambda: sum(c.methods().count("private/buy") for c in sim.connections) == 3
        )
        await engine.abort()
    await trio.sleep(15)
    assert len(sim.orders("main-id")) == 3
    still_open = [o["order_id"] for o in sim.open_orders("main-id")]
    assert still_open == []
    assert log_lines.events("gateway.cod_fired")


# ---- (1) a reload that restarts the session with on_shutdown: logout orphans the orders ------


async def test_a_reload_that_restarts_the_session_leaves_no_gateway_order_unprotected(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
) -> None:
    """``on_shutdown: logout`` is for stopping the keeper. A reload that only changes the
    heartbeat interval restarts the session while the engine keeps trading: its orders must
    not outlive the connection that protected them (or must be re-protected)."""
    account = gateway_account(sim, on_shutdown="logout")
    keeper = await run_keeper(nursery, account)
    old_link = upstream(sim)
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        order = await engine.buy()
        keeper.reload(keeper_config(dataclasses.replace(account, heartbeat_interval=15.0)))
        assert (await engine.until_closed()).code == 1012
    await until(keeper, lambda: not old_link.open and keeper.sessions["main"].ready)
    await until(keeper, ready_and_listening(keeper))
    assert upstream(sim) is not old_link and old_link.closed_by is not None
    orphans = [o["order_id"] for o in sim.open_orders("main-id", conn=old_link)]
    assert orphans == [], f"{order['order_id']} is open on a closed connection, COD-less"


# ---- (2) a slow upstream subscribe stops other links being read: false local COD ---------------


async def test_a_slow_subscribe_of_one_link_does_not_close_another_for_missed_heartbeats(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
) -> None:
    """research's subscribe takes Deribit 45 s; engine (heartbeat 10 s, answering every
    test_request, local COD on, one order) subscribes to another channel meanwhile. engine
    did nothing wrong: its link and its order stay."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as research, local_client(gateway) as engine:
        await research.auth(RESEARCH)
        await engine.auth()
        assert await engine.result("private/enable_cancel_on_disconnect") == "ok"
        assert await engine.result("public/set_heartbeat", {"interval": 10}) == "ok"
        order = await engine.buy()
        sim.delay_next("public/subscribe", 45.0)
        slow = {"channels": ["ticker.BTC-PERPETUAL.100ms"]}
        await research.send("public/subscribe", slow, id=research.next_id())
        await trio.sleep(0.1)
        other = {"channels": ["ticker.ETH-PERPETUAL.100ms"]}
        await engine.send("public/subscribe", other, id=engine.next_id())
        await trio.sleep(35)
        assert engine.closed is None, engine.closed
        assert engine.test_requests >= 3
        # checked while engine is still connected: its own clean close fires its local COD
        assert order["order_id"] in [o["order_id"] for o in sim.open_orders("main-id")]


# ---- (2) unbounded metric series from made-up method names during an outage -------------------


async def test_made_up_method_names_refused_during_an_outage_do_not_grow_the_metrics(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """500 distinct ``public/...`` names, refused 13028 while the upstream reconnects: the
    requests family must stay bounded (made-up names count as ``other``, as -32601 ones do)."""
    from .test_metrics import scrape

    slow = dataclasses.replace(gateway_account(sim).backoff, initial=30.0, max=30.0)
    keeper = await run_keeper(nursery, gateway_account(sim, backoff=slow))
    sim.refuse_handshakes(100)
    await sim.drop(upstream(sim), abrupt=True)
    async with local_client(keeper.gateways["main"]) as stranger:
        for n in range(500):
            name = "public/x_" + "".join(chr(ord("a") + int(d)) for d in f"{n:03d}")
            answer = await stranger.call(name)
            assert answer["error"]["code"] == 13028
    methods = {
        s.labels["method"]
        for s in scrape(keeper.metrics)
        if s.name == "deribit_keeper_gateway_requests_total"
    }
    assert len(methods) < 10, f"{len(methods)} method series"


# ---- (2) a bug in a gateway task takes the whole keeper down ----------------------------------


async def test_an_odd_upstream_answer_during_local_cod_never_takes_other_accounts_down(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """Deribit answers local COD's cancel with an order_state that is not a string. Whatever the
    gateway makes of it, the other account (and this one's session) must stay ready: sessions
    contain their own bugs for exactly this reason."""
    async with trio.open_nursery() as nursery:
        keeper = await run_keeper(nursery, gateway_account(sim), gateway_account(sim, "hedge"))
        link = upstream(sim)
        async with local_client(keeper.gateways["main"]) as engine:
            await engine.auth()
            assert await engine.result("private/enable_cancel_on_disconnect") == "ok"
            order = await engine.buy()
            sim.delay_next("private/cancel", 30.0)
            await engine.abort()
        await sim.wait_for(lambda: "private/cancel" in link.methods())
        upstream_id = len(link.methods()) - link.methods()[::-1].index("private/cancel")
        odd = {**order, "order_state": {"unexpected": True}}
        await sim.send_raw(link, json.dumps({"jsonrpc": "2.0", "id": upstream_id, "result": odd}))
        await trio.sleep(2)
        assert keeper.sessions["hedge"].ready and keeper.sessions["main"].ready
        keeper.stop()


# ---- (2) a link that ends while its unsubscribe waits stays subscribed forever -----------------


async def test_a_link_that_ends_while_its_unsubscribe_waits_leaves_its_channels_all_the_same(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """engine holds the only subscription to an ETH ticker; while research's subscribe waits 45 s
    on Deribit, engine unsubscribes and dies. Once all is settled the gateway holds no ETH
    subscription, upstream or locally."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    eth = "ticker.ETH-PERPETUAL.100ms"
    async with local_client(gateway) as research:
        async with local_client(gateway, answer_heartbeats=False) as engine:
            assert await engine.result("public/subscribe", {"channels": [eth]}) == [eth]
            assert await engine.result("public/set_heartbeat", {"interval": 10}) == "ok"
            sim.delay_next("public/subscribe", 45.0)
            slow = {"channels": ["ticker.BTC-PERPETUAL.100ms"]}
            await research.send("public/subscribe", slow, id=research.next_id())
            await trio.sleep(0.1)
            await engine.send("public/unsubscribe", {"channels": [eth]}, id=engine.next_id())
            await trio.sleep(0.1)
            await engine.abort()
            await trio.sleep(30)  # a missed heartbeat ends it, if the abort went unnoticed
        await trio.sleep(30)  # research's subscribe is answered; everything has settled
        assert eth not in gateway.fanout.channels()
        assert eth not in upstream(sim).channels


# ---- regression guard: odd characters in relayed params never end a link ---------------------


async def test_a_lone_surrogate_in_relayed_params_gets_an_answer_and_the_link_stays(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """A lone surrogate (valid JSON ``"\\ud800"``) in a subscribe or a relayed request reaches
    the upstream send path. Passes today (ensure_ascii escapes it); guards a change to raw
    UTF-8 upstream frames, where encoding raises outside the RpcFault handling."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        for method in ("public/subscribe", "public/get_instruments"):
            request_id = engine.next_id()
            params = {"channels": ["ticker.\ud800.100ms"], "currency": "\ud800"}
            await engine.send(method, params, id=request_id)
            with trio.fail_after(5):
                await answer_or_close(engine, request_id)
            assert engine.closed is None and engine.answer(request_id) is not None
        assert (await engine.call("public/test"))["result"]
    assert upstream(sim).open


# ---- (1) a link closed while its order is being written upstream loses local COD ---------------


async def test_a_link_closed_while_an_order_is_being_sent_still_has_its_orders_cancelled(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upstream write of engine's second buy stalls (TCP backpressure, simulated by a
    slow ``RpcConnection._send`` for buys only) past engine's local heartbeat; the link is
    closed as heartbeat_missed with local COD on: its resting order must be cancelled."""
    from deribit_keeper import rpc

    real_send = rpc.RpcConnection._send
    stall = {"on": False}

    async def slow_send(self: rpc.RpcConnection, message: dict[str, Any]) -> None:
        if stall["on"] and message.get("method") == "private/buy":
            await trio.sleep(60)
        await real_send(self, message)

    monkeypatch.setattr(rpc.RpcConnection, "_send", slow_send)
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"], answer_heartbeats=False) as engine:
        await engine.auth()
        assert await engine.result("private/enable_cancel_on_disconnect") == "ok"
        assert await engine.result("public/set_heartbeat", {"interval": 10}) == "ok"
        resting = await engine.buy()
        stall["on"] = True
        params = {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 39_000}
        await engine.send("private/buy", params, id=engine.next_id())
        closed = await engine.until_closed()
        assert closed.reason == "heartbeat test_request unanswered"
    with trio.fail_after(1):
        await sim.wait_for(lambda: resting["order_id"] not in open_ids(sim))


# ---- (3) a local token reaches Deribit ---------------------------------------------------


async def test_a_local_access_token_never_reaches_deribit(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Clients that put ``access_token`` on every request (as REST-minded ones do) must not
    hand the keeper's local tokens to the exchange: "Deribit never sees a local token"."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as engine:
        token = (await engine.auth())["access_token"]
        await engine.call("public/get_instruments", {"currency": "BTC", "access_token": token})
    sent = json.dumps([params for c in sim.connections for _, params in c.requests])
    assert token not in sent, "the local access token was forwarded upstream"
