"""A lean Deribit for load: the few methods a keeper needs, for 1,000 links, stamped by the kernel.

The real simulator (``deribit_keeper.simulator``) models an exchange, faults and records for
tests; under 1,000 links its own work would be part of what the benchmark measures. This one
speaks only what the keeper (and the floor's bare clients) send: ``public/hello``,
``public/auth`` (``client_credentials``, ``client_signature``, ``refresh_token``),
``private/enable_cancel_on_disconnect``, ``private/disable_cancel_on_disconnect``,
``private/get_cancel_on_disconnect``, ``public/set_heartbeat``, ``public/disable_heartbeat``,
``public/test`` and ``private/logout``; anything else is -32601. The answers come from the
same ``jsonrpc`` and ``signatures`` code as the real simulator's, and
tests/test_bench_load_sim.py checks that both answer the same request sequence identically.

Why it is lean: plain non-blocking sockets under Trio (no stream layers), wsproto only to read
frames (answers are framed here: a server's frames are unmasked, so a test_request is the same
bytes for every link), every send a direct ``send()`` that never waits (a full socket buffer
parks the rest for a flush task), and one task for all heartbeats instead of one per link.

What it measures, on its own side of the wire:

- the answer latency of every test_request: from just before the ``send()`` of the
  notification to the kernel's receive timestamp (``SO_TIMESTAMPNS``) of the ``public/test``
  that answers it, so the simulator's own scheduling never counts;
- when each link became ready (its ``public/set_heartbeat`` answered) and when the first TCP
  connection came, for the time until all are ready, at start and after ``reset_all``;
- when each ``public/auth`` arrived, for how a reconnect storm spreads;
- how long a link it fell silent on takes to be dropped by the client (dead-link detection).

Heartbeat phases: ``deribit`` (the first test_request one interval after set_heartbeat, as the
real simulator does), ``spread`` (link k of N at offset k/N of the interval: an even load) or
``bunched`` (every link at the same instant: the burst). Changing the phase keeps a link's
test_requests between 0.05 and 1.05 intervals apart. As on Deribit (and the real simulator), a
link whose previous test_request is still unanswered when the next is due is closed (1000).

Controlled over stdin and stdout, one JSON object per line each way (see ``Control``); the
first line out is ``{"port": N}``.

    python bench/load_sim.py --accounts 1000 --phase spread
"""

from __future__ import annotations

import argparse
import heapq
import hmac
import itertools
import json
import math
import secrets
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from deribit_keeper.jsonrpc import (
    BadFrame,
    RpcFault,
    error_frame,
    get_choice,
    get_int,
    get_number,
    get_str,
    invalid,
    notification_frame,
    opt_bool,
    opt_str,
    parse_frame,
    result_frame,
)
from deribit_keeper.protocol import API_VERSION, HEARTBEAT_MIN_S, ErrorCode
from deribit_keeper.signatures import SignatureRejected, SignatureVerifier

# Linux's numbers; Python's socket module does not name them. SCM_ equals SO_ for this option.
SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)
RECV_BYTES: Final = 65536
ANCILLARY_BYTES: Final = socket.CMSG_SPACE(16)  # one struct timespec
CLOSE_TIMEOUT_S: Final = 5.0  # as the real simulator: how long a close waits for the client's
PHASES: Final = ("deribit", "spread", "bunched")
COD_SCOPES: Final = ("connection", "account")  # as simulator/session.py
GRANT_TYPES: Final = ("client_credentials", "client_signature", "refresh_token")
TEST_REQUEST: Final = notification_frame("heartbeat", {"type": "test_request"})


def text_frame(text: str) -> bytes:
    """One unmasked, final WebSocket text frame (RFC 6455 section 5.2), as a server sends it."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + payload


TEST_REQUEST_FRAME: Final = text_frame(TEST_REQUEST)


@dataclass(slots=True)
class Token:
    """An issued token: whose, which kind, until when (Trio time), and whether it was used up."""

    client_id: str
    kind: str
    expires_at: float
    revoked: bool = False


class Link:
    """One accepted connection: its socket, its WebSocket state and what the benchmark stamps.

    Sends never wait: ``send`` writes what the socket takes at once and parks the rest for a
    flush task, so neither the heartbeat task nor a reader ever blocks on one slow client.
    """

    __slots__ = (
        "accepted_ns",
        "access_token",
        "client_id",
        "close_deadline",
        "cod",
        "ended",
        "flushing",
        "gen",
        "interval",
        "last_test",
        "out",
        "parts",
        "ready_ns",
        "silence",
        "silent_ns",
        "slot",
        "sock",
        "test_sent_ns",
        "test_tag",
        "ws",
    )

    def __init__(self, sock: socket.socket, accepted_ns: int) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.SERVER)
        self.accepted_ns = accepted_ns
        self.out = bytearray()
        self.flushing = False
        self.parts: list[str] = []  # a fragmented message so far
        self.client_id: str | None = None
        self.access_token: str | None = None
        self.cod = False
        self.interval: float | None = None
        self.gen = 0  # bumped whenever the heartbeat schedule changes: older heap entries die
        self.slot = 0
        self.last_test: float | None = None  # Trio time of the last test_request
        self.test_sent_ns: int | None = None  # wall ns of the outstanding test_request
        self.test_tag = ""  # the phase it was sent in
        self.ready_ns: int | None = None
        self.silence: str | None = None  # armed: "after_test_request" | "after_test_answer"
        self.silent_ns: int | None = None  # when it fell silent
        self.close_deadline = math.inf
        self.ended = False


@dataclass
class Stats:
    """What the benchmark reads back: raw stamps, so that run.py computes every figure alike."""

    latencies: dict[str, list[int]] = field(default_factory=dict)  # phase -> ns
    auth_ns: list[int] = field(default_factory=list)
    first_accept_ns: int | None = None
    reset_ns: int | None = None
    detections: dict[str, list[float]] = field(default_factory=dict)  # where -> seconds
    bursts: list[float] = field(default_factory=list)  # seconds each bunched tick took to send


class LoadSim:
    """The server; ``serve`` runs it, ``Control`` commands it.

    Args:
        accounts: API keys id<i> / secret<i> for i below this.
        phase: the heartbeat phase mode (see the module docstring).
        spread: links per interval the ``spread`` phase divides it among (default accounts).
        token_ttl_s: ``expires_in`` of every token.
    """

    def __init__(
        self,
        accounts: int,
        *,
        phase: str = "deribit",
        spread: int | None = None,
        token_ttl_s: float = 86400.0,
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}")
        self.secrets = {f"id{i}": f"secret{i}" for i in range(accounts)}
        self.account_cod = dict.fromkeys(self.secrets, False)
        self.phase = phase
        self.spread = max(1, spread if spread is not None else accounts)
        self.token_ttl_s = token_ttl_s
        self.tokens: dict[str, Token] = {}
        self.verifier = SignatureVerifier()
        self.links: set[Link] = set()
        self.ready = 0
        self.stats = Stats()
        self.kernel_stamps = True  # until a socket refuses SO_TIMESTAMPNS
        self._slots = itertools.count()
        self._seq = itertools.count()
        self._heap: list[tuple[float, int, Link, int]] = []
        self._epoch = 0.0
        self._wake = trio.Event()
        self.changed = trio.Event()  # set (and replaced) on every ready or end
        self._nursery: trio.Nursery | None = None

    # ---- sockets ------------------------------------------------------------------------

    async def serve(self, port: int = 0, *, task_status: trio.TaskStatus[int]) -> None:
        """Listen on 127.0.0.1:``port`` until cancelled; report the bound port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(4096)  # 1,000 clients connect at once
        listener.setblocking(False)
        self._epoch = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeats)
                task_status.started(int(listener.getsockname()[1]))
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    self._accept_all(listener, nursery)
        finally:
            for link in list(self.links):
                self.abort(link)
            trio.lowlevel.notify_closing(listener)
            listener.close()

    def _accept_all(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            now = time.time_ns()
            if self.stats.first_accept_ns is None:
                self.stats.first_accept_ns = now
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                self.kernel_stamps = False
            link = Link(sock, now)
            self.links.add(link)
            nursery.start_soon(self._serve_link, link)

    async def _serve_link(self, link: Link) -> None:
        try:
            while not link.ended:
                with trio.move_on_at(link.close_deadline):
                    await trio.lowlevel.wait_readable(link.sock)
                if link.ended or trio.current_time() >= link.close_deadline:
                    break
                try:
                    data, ancillary, _, _ = link.sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
                except BlockingIOError:
                    continue
                rx_ns = _kernel_ns(ancillary)
                if not data:
                    break
                link.ws.receive_data(data)
                for event in link.ws.events():
                    self._on_event(link, event, rx_ns)
        except (OSError, trio.ClosedResourceError, RemoteProtocolError):
            pass  # the client reset the link, or sent what is not WebSocket: it ends
        finally:
            self._end(link)

    def send(self, link: Link, data: bytes) -> None:
        """Write now what the socket takes; park the rest for a flush task."""
        if link.ended:
            return
        if link.out:
            link.out += data
            return
        try:
            sent = link.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the reader sees the end
        if sent < len(data):
            link.out += data[sent:]
            if not link.flushing and self._nursery is not None:
                link.flushing = True
                self._nursery.start_soon(self._flush, link)

    async def _flush(self, link: Link) -> None:
        try:
            while link.out and not link.ended:
                await trio.lowlevel.wait_writable(link.sock)
                try:
                    sent = link.sock.send(link.out)
                except BlockingIOError:
                    continue
                del link.out[:sent]
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            link.flushing = False

    def close(self, link: Link, code: int = 1000) -> None:
        """A clean close: the close frame now, then wait (bounded) for the client's."""
        if link.ended or link.ws.state is not ConnectionState.OPEN:
            return
        self.send(link, link.ws.send(CloseConnection(code=code)))
        link.close_deadline = trio.current_time() + CLOSE_TIMEOUT_S

    def abort(self, link: Link, *, reset: bool = False) -> None:
        """End the link at once, without a close frame; ``reset`` sends a TCP RST, not a FIN."""
        if link.ended:
            return
        if reset:
            try:
                link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already gone
        self._end(link)

    def _end(self, link: Link) -> None:
        if link.ended:
            return
        link.ended = True
        now = time.time_ns()
        self.links.discard(link)
        if link.ready_ns is not None:
            self.ready -= 1
        if link.silent_ns is not None and link.silence is not None:
            detected = (now - link.silent_ns) / 1e9
            self.stats.detections.setdefault(link.silence, []).append(detected)
        trio.lowlevel.notify_closing(link.sock)
        link.sock.close()
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # ---- frames -------------------------------------------------------------------------

    def _on_event(self, link: Link, event: object, rx_ns: int) -> None:
        if isinstance(event, Request):
            self.send(link, link.ws.send(AcceptConnection()))
        elif isinstance(event, TextMessage | BytesMessage):
            part = event.data if isinstance(event, TextMessage) else event.data.decode("utf-8")
            link.parts.append(part)
            if event.message_finished:
                text, link.parts = "".join(link.parts), []
                self._on_message(link, text, rx_ns)
        elif isinstance(event, Ping):
            self.send(link, link.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if link.ws.state is ConnectionState.REMOTE_CLOSING:
                self.send(link, link.ws.send(event.response()))
            self._end(link)

    def _on_message(self, link: Link, text: str, rx_ns: int) -> None:
        if link.silent_ns is not None or link.close_deadline < math.inf:
            return  # silent, or closing: nothing more is answered
        us_in = rx_ns // 1000
        try:
            request = parse_frame(text)
        except BadFrame as bad:
            self.send(link, text_frame(error_frame(bad.request_id, bad.fault, us_in, _us())))
            return
        try:
            result = self._dispatch(link, request.method, request.params, rx_ns)
        except RpcFault as fault:
            frame = error_frame(request.id, fault, us_in, _us())
        except _CloseWithoutAnswer:
            self.close(link, 1000)
            return
        else:
            frame = result_frame(request.id, result, us_in, _us())
        self.send(link, text_frame(frame))
        ready = request.method == "public/set_heartbeat" and link.interval is not None
        if ready and link.ready_ns is None:
            link.ready_ns = time.time_ns()  # the answer is out: the client is ready now
            self.ready += 1
            self._changed()
        if link.silence == "after_test_answer" and request.method == "public/test":
            link.silent_ns = time.time_ns()

    # ---- methods (as simulator/session.py answers them) ---------------------------------

    def _dispatch(self, link: Link, method: str, params: dict[str, Any], rx_ns: int) -> Any:
        if method == "public/test":
            return self._test(link, params, rx_ns)
        if method == "public/hello":
            get_str(params, "client_name")
            get_str(params, "client_version")
            return {"version": API_VERSION}
        if method == "public/auth":
            self.stats.auth_ns.append(rx_ns)
            return self._auth(link, params)
        if method == "public/set_heartbeat":
            interval = get_number(params, "interval")
            if interval < HEARTBEAT_MIN_S:
                raise invalid("interval", f"must be at least {HEARTBEAT_MIN_S}")
            self._schedule(link, interval)
            return "ok"
        if method == "public/disable_heartbeat":
            self._schedule(link, None)
            return "ok"
        if method in (
            "private/enable_cancel_on_disconnect",
            "private/disable_cancel_on_disconnect",
        ):
            client_id = self._client(link, params)
            enabled = method == "private/enable_cancel_on_disconnect"
            if get_choice(params, "scope", COD_SCOPES, "connection") == "account":
                self.account_cod[client_id] = enabled
            else:
                link.cod = enabled
            return "ok"
        if method == "private/get_cancel_on_disconnect":
            client_id = self._client(link, params)
            scope = get_choice(params, "scope", COD_SCOPES, "connection")
            enabled = self.account_cod[client_id] if scope == "account" else link.cod
            return {"scope": scope, "enabled": enabled}
        if method == "private/logout":
            self._client(link, params)
            opt_bool(params, "invalidate_token", True)
            raise _CloseWithoutAnswer
        raise RpcFault(ErrorCode.METHOD_NOT_FOUND)

    def _test(self, link: Link, params: dict[str, Any], rx_ns: int) -> Any:
        if link.test_sent_ns is not None:  # any public/test answers the test_request
            self.stats.latencies.setdefault(link.test_tag, []).append(rx_ns - link.test_sent_ns)
            link.test_sent_ns = None
        if "expected_result" in params:
            get_choice(params, "expected_result", ("exception",))
            raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE)
        return {"version": API_VERSION}

    def _auth(self, link: Link, params: dict[str, Any]) -> Any:
        grant_type = get_choice(params, "grant_type", GRANT_TYPES)
        opt_str(params, "scope", "")
        now = trio.current_time()
        if grant_type == "client_credentials":
            client_id = get_str(params, "client_id")
            secret = get_str(params, "client_secret")
            known = self.secrets.get(client_id)
            if known is None or not hmac.compare_digest(known.encode(), secret.encode()):
                raise RpcFault(ErrorCode.INVALID_CREDENTIALS)
        elif grant_type == "client_signature":
            client_id = get_str(params, "client_id")
            timestamp, nonce = get_int(params, "timestamp"), get_str(params, "nonce")
            signature, data = get_str(params, "signature"), opt_str(params, "data", "")
            known = self.secrets.get(client_id)
            if known is None:
                raise RpcFault(ErrorCode.INVALID_CREDENTIALS)
            try:
                self.verifier.verify(
                    client_id, known, timestamp, nonce, signature, data, wall_now=time.time()
                )
            except SignatureRejected as rejected:
                raise RpcFault(ErrorCode.UNAUTHORIZED) from rejected
        else:
            token = self._live(get_str(params, "refresh_token"), "refresh", now)
            token.revoked = True
            client_id = token.client_id
        access, refresh = self._new_token(), self._new_token()
        expires_at = now + self.token_ttl_s
        self.tokens[access] = Token(client_id, "access", expires_at)
        self.tokens[refresh] = Token(client_id, "refresh", expires_at)
        if link.client_id != client_id:  # as the real simulator: COD from the account setting
            link.cod = self.account_cod[client_id]
        link.client_id, link.access_token = client_id, access
        return {
            "access_token": access,
            "expires_in": int(self.token_ttl_s),
            "refresh_token": refresh,
            "scope": "connection mainaccount",
            "token_type": "bearer",
            "enabled_features": [],
        }

    def _client(self, link: Link, params: dict[str, Any]) -> str:
        """The account a private request acts for (its own token, else the link's), or 13009."""
        now = trio.current_time()
        if "access_token" in params:
            return self._live(get_str(params, "access_token"), "access", now).client_id
        if link.access_token is None:
            raise RpcFault(ErrorCode.UNAUTHORIZED)
        return self._live(link.access_token, "access", now).client_id

    def _live(self, value: str, kind: str, now: float) -> Token:
        token = self.tokens.get(value)
        if token is None or token.kind != kind or token.revoked or now >= token.expires_at:
            raise RpcFault(ErrorCode.UNAUTHORIZED)
        return token

    def _new_token(self) -> str:
        """Shaped like Deribit's (and the real simulator's): ``<ms>.<8 chars>.<random>``."""
        return (
            f"{time.time_ns() // 1_000_000}.{secrets.token_urlsafe(6)}.{secrets.token_urlsafe(24)}"
        )

    # ---- heartbeats ---------------------------------------------------------------------

    def _schedule(self, link: Link, interval: float | None) -> None:
        """(Re)start ``link``'s test_requests under the current phase mode; None stops them."""
        link.interval = interval
        link.test_sent_ns = None  # a new schedule starts with a clean slate
        link.gen += 1
        if interval is None:
            return
        if link.slot == 0:
            link.slot = next(self._slots) + 1
        self._push(link, self._first_due(link, trio.current_time()))

    def _first_due(self, link: Link, now: float) -> float:
        interval = link.interval
        assert interval is not None
        if self.phase == "deribit":
            return now + interval
        offset = ((link.slot - 1) % self.spread) * interval / self.spread
        if self.phase == "bunched":
            offset = 0.0
        # A phase change may bring a link's next test_request closer (its last one has long been
        # answered), never push it past 1.05 intervals: a client that probes a quiet link
        # (the keeper does at 1.1) must not see the benchmark's own change as silence.
        gap = 0.05 * interval
        earliest = now if link.last_test is None else max(now, link.last_test + gap)
        ticks = math.floor((earliest - self._epoch - offset) / interval) + 1
        return self._epoch + offset + ticks * interval

    def _push(self, link: Link, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), link, link.gen))
        self._wake.set()

    def set_phase(self, phase: str) -> float | None:
        """Move every link's next test_request to the new phase; for ``bunched``, returns
        the Trio time of the first tick at which all of them are due together."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}")
        self.phase = phase
        now = trio.current_time()
        dues = []
        for link in self.links:
            if link.interval is not None:
                link.gen += 1
                due = self._first_due(link, now)
                dues.append(due)
                self._push(link, due)
        return max(dues) if dues and phase == "bunched" else None

    async def _heartbeats(self) -> None:
        """One task sends every link's test_requests, each stamped just before its send()."""
        while True:
            now = trio.current_time()
            if not self._heap or self._heap[0][0] > now:
                deadline = self._heap[0][0] if self._heap else math.inf
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            started, sent = time.perf_counter(), 0
            while self._heap and self._heap[0][0] <= now:
                due, _, link, gen = heapq.heappop(self._heap)
                if gen != link.gen or link.ended or link.interval is None:
                    continue
                self._push(link, due + link.interval)
                if link.silent_ns is not None or link.close_deadline < math.inf:
                    continue
                if link.test_sent_ns is not None:
                    self.close(link, 1000)  # the previous one is still unanswered
                    continue
                link.last_test = now
                link.test_tag = self.phase
                link.test_sent_ns = time.time_ns()
                self.send(link, TEST_REQUEST_FRAME)
                sent += 1
                if link.silence == "after_test_request":
                    link.silent_ns = time.time_ns()
            if self.phase == "bunched" and sent > 1:
                self.stats.bursts.append(time.perf_counter() - started)
            await trio.lowlevel.checkpoint()

    # ---- commands -----------------------------------------------------------------------

    def arm_silence(self, where: str, count: int) -> int:
        """Make ``count`` ready links fall silent at the next ``where``; returns how many."""
        chosen = sorted(
            (link for link in self.links if link.ready_ns is not None and link.silence is None),
            key=lambda link: link.slot,
        )
        step = max(1, len(chosen) // max(count, 1))
        picked = chosen[::step][:count]
        for link in picked:
            link.silence = where
        return len(picked)


class _CloseWithoutAnswer(Exception):
    """private/logout: Deribit answers by closing the link."""


def _kernel_ns(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time of a segment (SCM_TIMESTAMPNS), else the time now."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanos = struct.unpack("qq", data[:16])
            return int(seconds * 1_000_000_000 + nanos)
    return time.time_ns()


def _us() -> int:
    return time.time_ns() // 1000


class Control:
    """The benchmark's side: one JSON command per line in, one JSON answer per line out.

    Commands (``cmd``): ``status``; ``wait_ready`` (``n``, ``timeout``): until ``n`` links
    are ready, with the time since the first TCP connection and since the last reset;
    ``phase`` (``mode``); ``latencies`` (``clear``): every answer latency so far in µs, by
    phase; ``bursts``: how long each bunched tick took to send; ``reset_all``: every link
    reset (RST); ``auths`` (``since_ns``): arrival times of public/auth in seconds after it;
    ``silence`` (``where``: a list, ``count``, ``timeout``): links fall silent, and how long
    the client takes to drop each; ``stop``.
    """

    def __init__(self, sim: LoadSim) -> None:
        self.sim = sim

    async def run(self, nursery: trio.Nursery) -> None:
        stdin = trio.wrap_file(sys.stdin)
        while True:
            line = await stdin.readline()
            if not line:
                break
            command = json.loads(line)
            if command.get("cmd") == "stop":
                break
            answer = await self.handle(command)
            print(json.dumps(answer), flush=True)
        nursery.cancel_scope.cancel()

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        sim, stats, cmd = self.sim, self.sim.stats, command.get("cmd")
        if cmd == "status":
            return {"open": len(sim.links), "ready": sim.ready, "phase": sim.phase,
                    "kernel_stamps": sim.kernel_stamps}  # fmt: skip
        if cmd == "wait_ready":
            n = int(command["n"])
            with trio.move_on_after(float(command.get("timeout", 60))):
                while sim.ready < n:
                    await sim.changed.wait()
            stamps = [link.ready_ns for link in sim.links if link.ready_ns is not None]
            last = max(stamps) if stamps else None
            answer: dict[str, Any] = {"ready": sim.ready, "ok": sim.ready >= n}
            origins = {"since_first": stats.first_accept_ns, "since_reset": stats.reset_ns}
            for name, origin in origins.items():
                if last is not None and origin is not None:
                    answer[name] = (last - origin) / 1e9
            return answer
        if cmd == "phase":
            tick = sim.set_phase(str(command["mode"]))
            tick_in = None if tick is None else tick - trio.current_time()
            return {"phase": sim.phase, "tick_in": tick_in}
        if cmd == "latencies":
            micros = {tag: [ns / 1000 for ns in values] for tag, values in stats.latencies.items()}
            if command.get("clear"):
                stats.latencies = {}
            return {"micros": micros}
        if cmd == "bursts":
            bursts, stats.bursts = stats.bursts, []
            return {"seconds": bursts}
        if cmd == "reset_all":
            stats.reset_ns = time.time_ns()
            closed = list(sim.links)
            for link in closed:
                sim.abort(link, reset=True)
            return {"closed": len(closed), "reset_ns": stats.reset_ns}
        if cmd == "auths":
            since = int(command.get("since_ns", 0))
            return {"seconds": [(ns - since) / 1e9 for ns in stats.auth_ns if ns >= since]}
        if cmd == "silence":
            return await self._silence(command)
        return {"error": f"unknown command {cmd!r}"}

    async def _silence(self, command: dict[str, Any]) -> dict[str, Any]:
        sim = self.sim
        sim.stats.detections = {}
        armed = {where: sim.arm_silence(where, int(command["count"])) for where in command["where"]}
        with trio.move_on_after(float(command.get("timeout", 60))):
            while any(len(sim.stats.detections.get(w, [])) < n for w, n in armed.items()):
                await sim.changed.wait()
        return {"armed": armed, "seconds": sim.stats.detections}


async def main_async(args: argparse.Namespace) -> None:
    sim = LoadSim(args.accounts, phase=args.phase, spread=args.spread, token_ttl_s=args.token_ttl)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, args.port)
        print(json.dumps({"port": port}), flush=True)
        await Control(sim).run(nursery)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000, help="API keys id<i>/secret<i>")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--phase", choices=PHASES, default="spread")
    parser.add_argument("--spread", type=int, help="links the spread phase divides among")
    parser.add_argument("--token-ttl", type=float, default=86400.0, help="expires_in, seconds")
    trio.run(main_async, parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
