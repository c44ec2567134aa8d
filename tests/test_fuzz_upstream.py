"""Fuzzing the upstream hop: whatever "Deribit" sends, one account at most loses its link.

Each example runs a fresh simulator and keeper (two accounts, each with a gateway and a local
client) on its own virtual clock, then sends the first account's upstream connection a sequence
of frames hypothesis draws: text and binary, JSON or not, truncated, of the wrong types, with
huge numbers and deep nesting, notifications of unknown methods or with odd params (heartbeats,
subscriptions to the channel the local client holds), answers to ids never sent and duplicate
answers to ids that were (the keeper numbers its requests 1, 2, ... on each connection), while
the local client keeps relaying orders so that answers are awaited when the junk arrives.

Throughout, the second account must stay READY on the very same upstream connection, its local
client connected and answered; the supervisor must keep running; the first account may lose its
link (a ``session.lost`` with a stable reason) but must be READY again at the end. A traceback
in the log (``session.unexpected_error``, ``*.observer_failed``, ``gateway.unexpected_error``)
is a bug, and fails the example.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, cast

import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from deribit_keeper import events
from deribit_keeper.rpc import RpcConnection
from deribit_keeper.session import SessionState
from deribit_keeper.simulator import SimConnection, Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import SIM_ACCOUNTS, LogLines
from .fuzz_support import JUNK, Bystander, Frame, first_bug, run_example
from .gateway_support import Client, connect, gateway_account, run_keeper, until, upstream

CHANNEL: Final = "user.orders.BTC-PERPETUAL.raw"  # what each local client subscribes to
RECOVERY_S: Final = 300.0  # virtual seconds: backoff (max 30 s) and set-up, with room to spare

# ---- the frames ------------------------------------------------------------------------------

# The keeper's own ids on a connection start at 1; anything else is an id it never sent.
IDS: Final = (
    st.integers(1, 40)
    | st.integers()
    | st.text(max_size=6)
    | st.floats()
    | st.booleans()
    | st.lists(st.integers(1, 3), max_size=2)
    | st.just({"id": 1})
)
ERRORS: Final = JUNK | st.fixed_dictionaries(
    {"code": st.sampled_from([10028, 13009, 13028, -32600, -32602, -32603, 11050, 0]) | JUNK},
    optional={"message": JUNK, "data": JUNK},
)
ANSWERS: Final = st.builds(
    lambda id_, body: {"jsonrpc": "2.0", "id": id_, **body},
    IDS,
    st.fixed_dictionaries({}, optional={"result": JUNK, "error": ERRORS, "usIn": JUNK}),
)
PARAMS: Final = (
    JUNK
    | st.fixed_dictionaries({"type": st.sampled_from(["test_request", "heartbeat"]) | JUNK})
    | st.fixed_dictionaries(
        {"channel": st.sampled_from([CHANNEL, "ticker.BTC-PERPETUAL.100ms"]) | JUNK},
        optional={"data": JUNK},
    )
)
NOTIFICATIONS: Final = st.builds(
    lambda method, params: {"jsonrpc": "2.0", "method": method, "params": params},
    st.sampled_from(["heartbeat", "subscription", "public/unknown", ""]) | JUNK,
    PARAMS,
)
NO_ID_ERRORS: Final = st.builds(lambda error: {"jsonrpc": "2.0", "error": error}, ERRORS)
MESSAGES: Final = ANSWERS | NOTIFICATIONS | NO_ID_ERRORS | JUNK
ODD_TEXT: Final = st.sampled_from(
    [
        "",
        " ",
        "null",
        "[]",
        "{}",
        '"text"',
        "1" * 5000,  # more digits than Python converts to int
        "1e999",
        '{"id": 1e999, "result": 1}',
        '{"id": NaN, "result": 1}',
        '{"jsonrpc": "2.0", "id": 1, "result": 1, "id": 2}',  # a key twice
        '{"method": "heartbeat", "params": {"type": "test_request"}}\n' * 3,
        "\ufeff{}",
        "x" * (1 << 20),  # a megabyte
        "[" * 300 + "]" * 300,  # deep, but within what Python's json reads
        '{"jsonrpc": "2.0", "method": "subscription", "params": {"channel": "'
        + CHANNEL
        + '", "data": '
        + '{"a": ' * 300
        + "1"
        + "}" * 300
        + "}}",
        "[" * 100_000 + "]" * 100_000,  # deeper than Python's recursion limit
        '{"a": ' * 50_000 + "1" + "}" * 50_000,
    ]
)


@dataclass(frozen=True)
class Pause:
    """Virtual seconds with no junk: heartbeats, a COD check or a reconnect happen meanwhile."""

    seconds: float


@dataclass(frozen=True)
class Relay:
    """The first account's local client sends an order, which Deribit answers only after
    ``delay`` seconds: the keeper awaits that answer when the junk comes."""

    delay: float


Step = Frame | Pause | Relay


def _text_of(message: object, cut: int | None) -> str:
    text = json.dumps(message)
    return text if cut is None else text[: cut % (len(text) + 1)]


TEXTS: Final = (
    st.builds(_text_of, MESSAGES, st.none() | st.integers(0, 200))  # whole, or truncated
    | ODD_TEXT
    | st.text(max_size=40)
)
STEPS: Final = st.lists(
    st.builds(Frame, TEXTS)
    | st.builds(Frame, TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")))  # binary
    | st.builds(Frame, st.binary(max_size=40))
    | st.builds(Pause, st.sampled_from([0.1, 5.0, 25.0]))
    | st.builds(Relay, st.sampled_from([0.0, 3.0, 30.0])),
    min_size=1,
    max_size=8,
)


# ---- one example -----------------------------------------------------------------------------


class Scene:
    """One keeper with two accounts on one simulator, and what the test watches of them."""

    def __init__(self, sim: Simulator, keeper: Keeper, bystander: Client) -> None:
        self.sim, self.keeper = sim, keeper
        self.bystander = Bystander(sim, keeper, bystander)
        self.trader: Client | None = None

    def main_ready(self) -> bool:
        return self.keeper.sessions["main"].state is SessionState.READY

    async def main_link(self) -> SimConnection:
        """The first account's current upstream connection, once it is READY (again)."""
        with trio.fail_after(RECOVERY_S):
            await until(self.keeper, self.main_ready)
        return upstream(self.sim, "main")


@asynccontextmanager
async def subscribed_client(keeper: Keeper, account: str) -> AsyncIterator[Client]:
    """A local client of ``account``'s gateway, authenticated and subscribed to CHANNEL."""
    port = keeper.gateways[account].port
    assert port is not None
    async with connect(port) as client:
        await client.auth()
        assert await client.result("private/subscribe", {"channels": [CHANNEL]}) == [CHANNEL]
        yield client


async def play(scene: Scene, steps: Sequence[Step], exits: AsyncExitStack) -> None:
    for step in steps:
        link = await scene.main_link()
        if isinstance(step, Frame):
            try:
                await scene.sim.send_raw(link, step.payload)
            except ValueError:
                pass  # the link ended under the previous frame: the next step waits for a new one
            await trio.sleep(0.01)  # let the keeper read it before the next check
        elif isinstance(step, Pause):
            await trio.sleep(step.seconds)
        else:
            if scene.trader is None or scene.trader.closed is not None:
                scene.trader = await exits.enter_async_context(
                    subscribed_client(scene.keeper, "main")
                )
            await relay(scene, scene.trader, link, step.delay)
        scene.bystander.assert_untouched()


async def relay(scene: Scene, trader: Client, link: SimConnection, delay: float) -> None:
    """Send an order through the gateway and return once it is on its way to Deribit.

    Waiting until the simulator has it keeps the junk from ending the link while the gateway
    is still sending: that race is test_a_relayed_request_whose_link_ends_while_sending_is_
    refused_as_unavailable's, and left to it.
    """
    scene.sim.delay_next("private/buy", delay)
    before = link.methods().count("private/buy")
    params = {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 40000.0}
    await trader.send("private/buy", params, id=trader.next_id())
    with trio.fail_after(RECOVERY_S):
        await scene.sim.wait_for(lambda: link.methods().count("private/buy") > before)


async def run_scene(steps: Sequence[Step]) -> None:
    """Set the scene, play ``steps`` and check the outcome; one trio.run per example."""
    sim = Simulator(list(SIM_ACCOUNTS))
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, 0)
        main, hedge = gateway_account(sim, "main"), gateway_account(sim, "hedge")
        keeper = await run_keeper(nursery, main, hedge)
        async with AsyncExitStack() as exits:
            bystander = await exits.enter_async_context(subscribed_client(keeper, "hedge"))
            scene = Scene(sim, keeper, bystander)
            await play(scene, steps, exits)
            await scene.main_link()  # the first account is back
            async with subscribed_client(keeper, "main") as trader:
                assert await trader.result("public/test") == {"version": "1.2.26"}
            assert await bystander.result("public/test") == {"version": "1.2.26"}
            scene.bystander.assert_untouched()
        keeper.stop()
        keeper.stop()  # at once: the test is over
        nursery.cancel_scope.cancel()


def assert_log_clean(found: list[dict[str, Any]]) -> None:
    """No bug event, and every lost link is the first account's, with a known reason."""
    bug = first_bug(found)
    assert bug is None, bug.get("exception", bug)
    for lost in (e for e in found if e["event"] == events.SESSION_LOST):
        assert lost["account"] == "main" and lost["reason"] != "internal_error", lost


def run(steps: Sequence[Step], log_lines: LogLines) -> None:
    run_example(partial(run_scene, steps), log_lines, assert_log_clean)


# The leak check's fixtures (log_lines, exposure) gather across every example of a test, which
# is what they are for here: hypothesis's warning about function-scoped fixtures does not apply.
@settings(
    max_examples=150,
    phases=[Phase.reuse, Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=STEPS)
def test_any_upstream_frames_leave_the_other_account_untouched(
    log_lines: LogLines, steps: list[Step]
) -> None:
    """Whatever Deribit sends one account, the other stays READY on its own link, the
    supervisor runs on, and the first account is READY again afterwards."""
    run(steps, log_lines)


def test_the_scene_itself_passes_with_nothing_odd_sent(log_lines: LogLines) -> None:
    """The harness alone: a relayed order and a pause disturb nobody (so a failure above is
    the junk's doing)."""
    run(
        [Relay(40000.0), Pause(25.0), Frame('{"jsonrpc": "2.0", "id": 9999, "result": 1}')],
        log_lines,
    )


# ---- bugs the fuzzing found, each with the test that keeps it fixed ----------------------------


async def test_a_frame_nested_deeper_than_pythons_recursion_limit_is_a_malformed_frame(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """``[[[...]]]`` 100 000 deep (200 kB, within the frame limit) is a malformed frame: the
    link is lost with reason malformed_frame, and nothing is logged as a bug."""
    keeper = await run_keeper(nursery, gateway_account(sim, "main"))
    await sim.send_raw(upstream(sim, "main"), "[" * 100_000 + "]" * 100_000)
    await until(keeper, lambda: bool(log_lines.events(events.SESSION_LOST)))
    assert not log_lines.events(events.SESSION_UNEXPECTED_ERROR)
    assert [e["reason"] for e in log_lines.events(events.SESSION_LOST)] == ["malformed_frame"]
    keeper.stop()


class StuckWebSocket:
    """A WebSocket whose next send waits for ``release``, then finds the link closed (1006)."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def send_message(self, message: str | bytes) -> None:
        await self.release.wait()
        raise ConnectionClosed(CloseReason(1006, None))


def test_a_relayed_request_whose_link_ends_while_sending_is_refused_as_unavailable() -> None:
    """The link ends (the reader sees the close) while a relayed request is being sent: the
    request raises SessionLost, and its ``on_answer`` is never told (the caller settles it
    from the exception: told as well, link.py's _relay settled it twice, and a KeyError made
    the order's client hear 11050 instead of 13028). (A trio.run of its own, so that the
    failed assertion is not wrapped in pytest-trio's exception group.)"""
    raised, heard = trio.run(_send_while_the_link_ends)
    assert raised == ["SessionLost"]
    assert heard == []


async def _send_while_the_link_ends() -> tuple[list[str], list[object]]:
    ws = StuckWebSocket()
    conn = RpcConnection(
        cast(WebSocketConnection, ws),
        cast(trio.SocketStream, None),  # never touched: the link is not shut down here
        on_notification=lambda method, params: None,
        request_timeout=5.0,
    )
    heard: list[object] = []
    raised: list[str] = []

    async def send() -> None:
        try:
            await conn.send_relayed("private/buy", {"amount": 10}, heard.append)
        except Exception as error:  # noqa: BLE001 (which one is the point of the test)
            raised.append(type(error).__name__)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        conn._end()  # what _read_frames does when it meets the close
        ws.release.set()
    return raised, heard


class SlowWebSocket:
    """A WebSocket whose next send completes only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def send_message(self, message: str | bytes) -> None:
        await self.release.wait()


def test_an_answer_that_arrives_while_its_request_is_still_being_sent_is_passed_on_once() -> None:
    """Deribit may answer before the sender resumes: ``on_answer`` then hears it exactly once,
    as soon as the send is over."""
    heard = trio.run(_answer_while_sending)
    assert heard == [{"jsonrpc": "2.0", "id": 1, "result": {"order": {"order_id": "7"}}}]


async def _answer_while_sending() -> list[object]:
    ws = SlowWebSocket()
    conn = RpcConnection(
        cast(WebSocketConnection, ws),
        cast(trio.SocketStream, None),
        on_notification=lambda method, params: None,
        request_timeout=5.0,
    )
    heard: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.send_relayed, "private/buy", {"amount": 10}, heard.append)
        await trio.testing.wait_all_tasks_blocked()
        conn._dispatch('{"jsonrpc": "2.0", "id": 1, "result": {"order": {"order_id": "7"}}}')
        conn._dispatch('{"jsonrpc": "2.0", "id": 1, "result": "a duplicate, ignored"}')
        ws.release.set()
    conn._end()
    return heard
