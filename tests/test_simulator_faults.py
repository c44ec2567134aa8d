"""The simulator's stage-aimed faults: breaking a connection instead of an answer, breaking a
WebSocket handshake, errors with any code, and the record of when each fault took effect.

These are what the fault matrix (test_fault_matrix.py) aims at each stage of a session; here
they are pinned on the wire with a bare client, independently of the keeper.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, HandshakeError, wrap_client_stream

from deribit_keeper.simulator import Simulator

from .test_simulator import API_PATH, Client, assert_envelope, connect, port_of, sim, start

__all__ = ["sim"]  # the fixture, imported for these tests


@pytest.mark.parametrize("code", [1000, 1001, 1011, 4000])
async def test_break_next_close_sends_the_close_code_instead_of_the_answer(
    sim: Simulator, code: int
) -> None:
    """break_next(how="close") answers the method with a close frame carrying ``code``."""
    sim.break_next("public/test", "close", code=code)
    async with connect(sim) as client:
        await client.send("public/test")
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert closed.value.reason is not None and closed.value.reason.code == code
    conn = sim.connections[0]
    assert (conn.closed_by, conn.close_code, conn.abrupt, conn.reset) == (
        "server",
        code,
        False,
        False,
    )


@pytest.mark.parametrize(("how", "reset"), [("eof", False), ("reset", True)])
async def test_break_next_eof_and_reset_end_tcp_without_a_close_frame(
    sim: Simulator, how: Any, reset: bool
) -> None:
    """eof closes the TCP connection (the client sees 1006); reset sends an RST."""
    sim.break_next("public/hello", how)
    async with connect(sim) as client:
        await client.result("public/test")
        await client.send("public/hello", {"client_name": "t", "client_version": "1"})
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert closed.value.reason is not None and closed.value.reason.code == 1006
    conn = sim.connections[0]
    assert (conn.closed_by, conn.close_code, conn.abrupt, conn.reset) == (
        "server",
        None,
        True,
        reset,
    )


async def test_break_next_silence_answers_nothing_more(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """silence: the method and everything after it go unanswered; TCP stays open."""
    sim.break_next("public/auth", "silence")
    async with connect(sim) as client:
        await client.send("public/auth", {"grant_type": "client_credentials"})
        await client.send("public/test")
        with trio.move_on_after(100):
            await client.recv()
            pytest.fail("a silenced connection answered")
        assert sim.connections[0].open


@pytest.mark.parametrize("frame", ["not json at all", b"\x00\xff binary", b'{"a": 1}'])
async def test_break_next_frame_sends_the_frame_instead_of_the_answer(
    sim: Simulator, frame: str | bytes
) -> None:
    """frame: the given text (or binary) frame arrives where the answer would have."""
    sim.break_next("public/test", "frame", frame=frame)
    async with connect(sim) as client:
        await client.send("public/test")
        assert await client.ws.get_message() == frame
        assert (await client.call("public/test"))["result"]  # only the next call was broken


async def test_break_next_applies_times_then_answers_again(sim: Simulator) -> None:
    """Two armed breaks take the next two calls, on whichever connections they arrive."""
    sim.break_next("public/test", "close", code=1011, times=2)
    for _ in range(2):
        async with connect(sim) as client:
            await client.send("public/test")
            with pytest.raises(ConnectionClosed):
                await client.recv()
    async with connect(sim) as client:
        assert await client.result("public/test")
    assert [c.close_code for c in sim.connections[:2]] == [1011, 1011]


@pytest.mark.parametrize(
    ("how", "kwargs"),
    [("bogus", {}), ("close", {"code": 1006}), ("close", {"code": 999}), ("close", {"times": 0})],
)
def test_break_next_refuses_nonsense(how: Any, kwargs: dict[str, Any]) -> None:
    """An unknown way to break, a code no close frame may carry or no times is a ValueError."""
    with pytest.raises(ValueError):
        Simulator([]).break_next("public/test", how, **kwargs)


async def test_fail_next_takes_any_code_with_a_message(sim: Simulator) -> None:
    """A code outside Deribit's table (-32603 Internal error) needs, and gets, its message."""
    sim.fail_next("public/test", -32603, message="Internal error")
    async with connect(sim) as client:
        request_id = await client.send("public/test")
        frame = await client.recv()
    assert frame["error"] == {"code": -32603, "message": "Internal error"}
    assert_envelope(frame, request_id)


async def test_drop_with_a_code_or_a_reset(sim: Simulator) -> None:
    """drop sends the given close code; drop(reset=True) aborts with an RST."""
    async with connect(sim) as client:
        await client.result("public/test")
        await sim.drop(sim.connections[0], code=1001)
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert closed.value.reason is not None and closed.value.reason.code == 1001
    async with connect(sim) as client:
        await client.result("public/test")
        await sim.drop(sim.connections[1], reset=True)
        with pytest.raises(ConnectionClosed):
            await client.recv()
    assert (sim.connections[1].abrupt, sim.connections[1].reset) == (True, True)


async def test_send_raw_sends_bytes_as_a_binary_frame(sim: Simulator) -> None:
    """send_raw with bytes puts a binary frame on the wire."""
    async with connect(sim) as client:
        await client.result("public/test")
        await sim.send_raw(sim.connections[0], b"\x01\x02")
        assert await client.ws.get_message() == b"\x01\x02"


async def _handshake(sim: Simulator) -> str:
    """Try one WebSocket handshake: 'accepted', or the name of the error that ended it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(sim))
    outcome = "accepted"
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", API_PATH)
            assert await Client(ws).result("public/test")
            await ws.aclose()
    except* (HandshakeError, ConnectionClosed, trio.BrokenResourceError) as failed:
        outcome = type(failed.exceptions[0]).__name__
    finally:
        await trio.aclose_forcefully(stream)
    return outcome


@pytest.mark.parametrize("how", ["blackhole", "stall"])
async def test_break_handshakes_that_never_finish_hold_the_client(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, how: Any
) -> None:
    """blackhole and stall never finish the handshake: the client waits until it gives up."""
    simulator = await start(nursery)
    simulator.break_handshakes(1, how)
    with trio.move_on_after(300) as waited:
        await _handshake(simulator)
    assert waited.cancelled_caught
    assert simulator.connections == []
    assert [t.fault for t in simulator.triggered] == [f"handshake {how}"]
    assert await _handshake(simulator) == "accepted"  # one armed: the next goes through


UPGRADE = (
    b"GET /ws/api/v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def _raw_handshake(sim: Simulator) -> tuple[bytes, str]:
    """Send a handshake request by hand; what came back, and how the stream ended."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(sim))
    received = bytearray()
    try:
        await stream.send_all(UPGRADE)
        while data := await stream.receive_some():
            received += data
        ended = "eof"
    except trio.BrokenResourceError:
        ended = "reset"
    finally:
        await trio.aclose_forcefully(stream)
    return bytes(received), ended


@pytest.mark.parametrize(
    ("how", "starts", "ended"),
    [
        ("reset", b"", "reset"),
        ("eof", b"", "eof"),
        ("garbage", b"this is not HTTP", "eof"),
        ("oversized", b"HTTP/1.1 101 Switching Protocols\r\nX-Filler: aaa", "eof"),
    ],
)
async def test_break_handshakes_that_end_at_once(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    how: Any,
    starts: bytes,
    ended: str,
) -> None:
    """reset, eof, garbage and an oversized head end the TCP connection with no WebSocket."""
    simulator = await start(nursery)
    simulator.break_handshakes(1, how)
    with trio.fail_after(1):
        received, how_it_ended = await _raw_handshake(simulator)
    assert received.startswith(starts) and how_it_ended == ended
    if how == "oversized":
        assert len(received) > 256 * 1024
    assert simulator.connections == []
    assert await _handshake(simulator) == "accepted"


async def test_break_handshakes_delay_answers_late(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """delay holds the handshake for the given seconds, then accepts it."""
    simulator = await start(nursery)
    simulator.break_handshakes(1, "delay", seconds=7)
    began = trio.current_time()
    assert await _handshake(simulator) == "accepted"
    assert trio.current_time() - began == pytest.approx(7)
    assert simulator.triggered[0].at == pytest.approx(began)


async def test_triggered_records_when_and_where_each_fault_took_effect(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """Failures, delays and breaks are noted with the Trio time and the connection they hit."""
    sim.fail_next("public/test", 13028)
    sim.delay_next("public/hello", 2)
    sim.break_next("public/auth", "close", code=1011)
    async with connect(sim) as client:
        await client.error("public/test")
        await trio.sleep(5)
        await client.call("public/hello", {"client_name": "t", "client_version": "1"})
        await client.send("public/auth", {"grant_type": "client_credentials"})
        with pytest.raises(ConnectionClosed):
            await client.recv()
    assert [(t.fault, t.conn) for t in sim.triggered] == [
        ("fail 13028", 1),
        ("delay 2s", 1),
        ("break close", 1),
    ]
    assert sim.triggered[1].at == pytest.approx(5)


@pytest.mark.parametrize(
    ("how", "kwargs"), [("bogus", {}), ("delay", {"seconds": -1.0}), ("stall", {"n": 0})]
)
def test_break_handshakes_refuses_nonsense(how: Any, kwargs: dict[str, Any]) -> None:
    """An unknown way, a negative delay or no handshakes at all is a ValueError."""
    n = kwargs.pop("n", 1)
    with pytest.raises(ValueError):
        Simulator([]).break_handshakes(n, how, **kwargs)
