"""Tests for probe.py against a real HTTP server on loopback.

The server is a few lines of ``trio.serve_tcp`` in the test's own loop, answering with fixed bytes.
``probe`` is blocking by design (it runs as its own short process), so the tests call it through
``trio.to_thread`` (threads are fine in a test, never in the keeper), and once as a real process,
the way Docker's HEALTHCHECK runs it. Only the timeout case waits in real time, a quarter second.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable

import pytest
import trio

from deribit_keeper.probe import probe

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def answering(status: str) -> Handler:
    """A handler that reads the request head, then answers ``status`` and closes."""

    async def handler(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (chunk := await stream.receive_some()):
            head += chunk
        body = b'{"ok": true}'
        await stream.send_all(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )

    return handler


async def silent(stream: trio.SocketStream) -> None:
    """A handler that accepts and never answers."""
    await trio.sleep_forever()


async def hangs_up(stream: trio.SocketStream) -> None:
    """A handler that reads the request and closes the connection cleanly without a word."""
    await stream.receive_some()
    await stream.aclose()


async def resets(stream: trio.SocketStream) -> None:
    """A handler that resets the connection (serve_tcp closes it forcefully on return)."""


async def serve(nursery: trio.Nursery, handler: Handler) -> str:
    """Serve ``handler`` on an ephemeral loopback port; the /healthz URL on it."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/healthz"


async def run_probe(url: str, timeout: float = 2.0) -> int:
    with trio.fail_after(5):
        return await trio.to_thread.run_sync(functools.partial(probe, url, timeout=timeout))


@pytest.mark.parametrize("status", ["200 OK", "204 No Content"])
async def test_2xx_is_healthy_and_quiet(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str], status: str
) -> None:
    """A 2xx answer exits 0 and prints nothing."""
    url = await serve(nursery, answering(status))
    assert await run_probe(url) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("status", ["503 Service Unavailable", "404 Not Found", "301 Moved"])
async def test_other_status_is_unhealthy(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str], status: str
) -> None:
    """Any other status, a redirect included (it is not followed), exits 1 naming the status."""
    url = await serve(nursery, answering(status))
    assert await run_probe(url) == 1
    assert capsys.readouterr().err == f"deribit-keeper probe: {url}: HTTP {status}\n"


async def test_refused_connection_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening on the port exits 1 with "connection refused"."""
    # A socket bound but not listening holds the port, so the refusal cannot race another test.
    with trio.socket.socket() as held:
        await held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert await run_probe(f"http://127.0.0.1:{port}/healthz") == 1
    assert capsys.readouterr().err.endswith(": connection refused\n")


async def test_silent_server_times_out(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that accepts and never answers exits 1 once the timeout passes."""
    url = await serve(nursery, silent)
    start = trio.current_time()
    assert await run_probe(url, timeout=0.25) == 1
    assert 0.2 <= trio.current_time() - start < 2
    assert capsys.readouterr().err.endswith(": no answer within 0.25s\n")


async def test_hang_up_is_unhealthy(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    """A connection closed without an answer exits 1 as a bad HTTP answer."""
    url = await serve(nursery, hangs_up)
    assert await run_probe(url) == 1
    assert capsys.readouterr().err.endswith(": bad HTTP answer: RemoteDisconnected\n")


async def test_reset_is_unhealthy(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reset connection exits 1 with one line (reset or broken pipe, whichever came first)."""
    url = await serve(nursery, resets)
    assert await run_probe(url) == 1
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:9464/healthz",
        "127.0.0.1:9464/healthz",
        "http:///healthz",
        "http://127.0.0.1:http/healthz",
        "http://127.0.0.1:99999/healthz",
        "http://127.0.0.1\x00:9464/healthz",
        "http://127.0.0.1:9464/he\x00lthz",
    ],
)
async def test_bad_url_is_unhealthy(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A URL that is not plain http:// to a host and port exits 1 with one "bad URL" line."""
    assert await run_probe(url) == 1
    err = capsys.readouterr().err
    assert ": bad URL: " in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(("status", "code"), [("200 OK", 0), ("503 Service Unavailable", 1)])
async def test_exit_code_of_a_real_process(nursery: trio.Nursery, status: str, code: int) -> None:
    """Run as its own process, as HEALTHCHECK does, the exit code is probe's answer."""
    url = await serve(nursery, answering(status))
    script = "import sys; from deribit_keeper.probe import probe; sys.exit(probe(sys.argv[1]))"
    with trio.fail_after(10):
        done = await trio.run_process(
            [sys.executable, "-c", script, url], check=False, capture_stderr=True
        )
    assert done.returncode == code
    assert done.stderr.decode().count("\n") == code
