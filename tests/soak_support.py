"""The soak's machinery: many accounts, engines that trade and subscribe, faults on both hops,
and the invariants watched throughout. Shared by ``tests/test_soak.py`` (24 simulated hours on
trio's autojump clock) and ``bench/soak.py`` (minutes of real time, the simulators in another
process), so both check exactly the same promises.

The world: one Simulator per account (an armed fault such as ``break_next`` is
simulator-wide, so one per account is what lets every fault be blamed on one account), one
Keeper holding every account with a gateway each, and a few local engines per gateway. Time
runs in **rounds**: faults are injected in the first part of a round (at most one upstream
fault per account and one local fault per engine), then the world settles (every fault
noticed, every account ready again, every engine reconnected), then the engines pause and
everything is measured against the baseline of the first round. A round's faults are drawn
from the seed and the round's number alone, so a seed replays the same run. The invariants:

(a) readiness: every ``session.ready``, and every sample of ``Session.ready``, ``/status``
    (``snapshot``), the sd_notify STATUS line and ``/readyz``, is checked against the
    simulator's own record of the link it was reported on (the record whose client port is the
    keeper's socket's): COD enabled on it, and at the checks it is the account's only open one;
(b) detection: every ``session.lost`` (and local ``gateway.client_disconnected``) comes within
    its documented bound of the moment the fault took effect (``Simulator.triggered``, or the
    injection for faults that act at once), with the expected reason and severity;
(c) orders: no open order on a simulator connection that ended with COD on; every order was
    made on a connection with COD on; a local link with local COD on that dies has its orders
    cancelled within 1 s of the gateway noticing (or, when the upstream link had died unnoticed
    and swallowed those cancels, by Deribit's COD once the keeper notices);
(d) backoff: each ``session.retry`` delay inside the policy's bounds for its severity, the
    attempt count as the policy says, the next attempt no sooner than the delay, and no more
    attempts than the faults explain;
(e) leaks: at every check the Trio tasks (per account, by walking the task tree), open file
    descriptors, and the per-account tables (gateway links, their subscriptions and order
    books, upstream channels, HTTP order books, requests in flight) are back to baseline, and
    every three simulated hours a census of the keeper's live objects (sessions, links, RPC
    connections, sockets: what holds an account's memory) after a full collection;
(f) routing: every answer an engine gets answers an id it sent (ids are unique over the whole
    world), once, with its own order in it; every notification is on a channel it holds, and
    every order notification is its own account's.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import random
import re
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from deribit_keeper.backoff import STABLE_AFTER_S
from deribit_keeper.config import (
    AccountConfig,
    BackoffConfig,
    GatewayConfig,
    HttpConfig,
    KeeperConfig,
    LocalClient,
    LogConfig,
    Secret,
)
from deribit_keeper.gateway import Gateway
from deribit_keeper.gateway.local_auth import MAX_TOKENS
from deribit_keeper.protocol import sign
from deribit_keeper.session import Session, silence_limit
from deribit_keeper.simulator import SimAccount, Simulator
from deribit_keeper.simulator.connection import reset_on_close
from deribit_keeper.supervisor import Keeper
from deribit_keeper.systemd import status_line

Op = dict[str, Any]  # one simulator call, as JSON: {"op": "drop", "abrupt": true, ...}

AT_ONCE: Final = 0.5  # "any failure ends that connection": noticed as the frame or close arrives
LOCAL_COD_S: Final = 1.0  # README: local COD cancels a dead link's orders within 1 s
TASK_SLACK: Final = 2  # tasks a group may be above its baseline at a check (a heartbeat's answer)
FD_SLACK: Final = 4
# A bound met exactly (a 5 s timeout noticed after 5 s) differs from it by float rounding of
# Trio times thousands of seconds in: a microsecond is far below anything a bound means.
FLOAT_NOISE: Final = 1e-6


# ---- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a soak runs: how long, how big, how often things break. Times in seconds."""

    seed: int
    hours: float = 24.0
    accounts: int = 10
    clients: int = 2  # local engines per account
    heartbeat: float = 60.0  # upstream heartbeat_interval (Deribit support suggests 30 to 60)
    local_heartbeat: float = 60.0
    request_timeout: float = 5.0
    cod_check_interval: float = 300.0
    token_ttl: float = 7200.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    round_s: float = 300.0
    act_s: float = 120.0  # faults are injected in the first act_s of a round
    settle_s: float = 600.0  # a round's faults must be over by then, or the soak fails
    upstream_p: float = 0.15  # chance an account meets an upstream fault in a round
    local_p: float = 0.08  # chance an engine meets a local fault in a round
    action_gap: float = 300.0  # mean seconds between an engine's requests
    margin: float = 0.0  # added to every bound: real-time scheduling (bench), none virtually

    @property
    def rounds(self) -> int:
        return max(1, math.ceil(self.hours * 3600 / self.round_s))

    @property
    def silence(self) -> float:
        return silence_limit(self.heartbeat)

    @property
    def local_silence(self) -> float:
        """A local test_request unanswered when the next is due: two local intervals."""
        return 2 * self.local_heartbeat


def account_name(index: int) -> str:
    """The name of account ``index``: also the first part of every label its engines use."""
    return f"acct{index:02d}"


def sim_account(index: int) -> SimAccount:
    """Account ``index`` as its simulator knows it; the secret is easy to grep for in any output."""
    name = account_name(index)
    return SimAccount(name, f"{name}-id", f"{name}-SECRET-do-not-log")


def engine(index: int, slot: int) -> LocalClient:
    """The local credential of the engine in ``slot`` of account ``index``: never Deribit's."""
    return LocalClient(f"engine{slot}", Secret(f"{account_name(index)}-engine{slot}-SECRET"))


def keeper_config(plan: Plan, urls: Sequence[str]) -> KeeperConfig:
    """Every account with a gateway on port 0; even accounts turn local COD on for every link."""
    accounts = []
    for index, url in enumerate(urls):
        sim = sim_account(index)
        gateway = GatewayConfig(
            host="127.0.0.1",
            port=0,
            clients=tuple(engine(index, slot) for slot in range(plan.clients)),
            cancel_on_disconnect=index % 2 == 0,
        )
        accounts.append(
            AccountConfig(
                name=sim.name,
                client_id=sim.client_id,
                client_secret=Secret(sim.client_secret),
                url=url,
                environment=None,
                heartbeat_interval=plan.heartbeat,
                request_timeout=plan.request_timeout,
                cod_check_interval=plan.cod_check_interval,
                backoff=BackoffConfig(initial=plan.backoff_initial, max=plan.backoff_max),
                gateway=gateway,
            )
        )
    return KeeperConfig(
        source=Path("soak.yaml"),
        log=LogConfig(level="info"),
        accounts=tuple(accounts),
        http=HttpConfig(host="127.0.0.1", port=0),
    )


# ---- the faults ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """One ``session.lost`` a fault must cause: its reason (one of), severity, and bound."""

    reasons: frozenset[str]
    severity: str
    bound: float


@dataclass(frozen=True)
class UpstreamFault:
    """What is done to an account's simulator, and what the keeper must make of it.

    ``ops`` run in order; the first acts on the account's current link when ``at_once`` (a
    drop, silence: it takes effect as it is made); the rest are armed and take effect when
    the simulator notes them in ``triggered``. ``losses`` pair in order with those moments.
    ``note``: an event that must be seen instead of a loss (a kept link).
    """

    name: str
    ops: tuple[Op, ...]
    losses: tuple[Loss, ...]
    at_once: bool = False
    note: str | None = None
    provoke: bool = False  # an engine places an order at once, to meet a fault armed on buy


def upstream_faults(plan: Plan) -> dict[str, UpstreamFault]:
    """The upstream catalogue, with the bounds the README documents (see test_fault_matrix)."""
    rt, silence = plan.request_timeout, plan.silence

    def loss(reason: str, bound: float, severity: str = "transient") -> Loss:
        return Loss(frozenset({reason}), severity, bound + plan.margin)

    dropped = loss("connection_dropped", AT_ONCE)
    rst: Op = {"op": "drop", "reset": True}
    faults = [
        UpstreamFault("drop_1000", ({"op": "drop"},), (loss("closed_by_server", AT_ONCE),), True),
        UpstreamFault("drop_1011", ({"op": "drop", "code": 1011},), (dropped,), True),
        UpstreamFault("drop_eof", ({"op": "drop", "abrupt": True},), (dropped,), True),
        UpstreamFault("drop_rst", (rst,), (dropped,), True),
        UpstreamFault(
            "blackhole",
            ({"op": "go_silent"},),
            (Loss(frozenset({"heartbeat_silence", "request_timeout"}), "transient", silence),),
            True,
        ),
        UpstreamFault("test_rst", (_break("public/test", "reset"),), (dropped,)),
        UpstreamFault("test_eof", (_break("public/test", "eof"),), (dropped,)),
        UpstreamFault("test_close_1001", (_break("public/test", "close", code=1001),), (dropped,)),
        UpstreamFault(
            "test_silence", (_break("public/test", "silence"),), (loss("request_timeout", rt),)
        ),
        UpstreamFault(
            "test_garbage",
            (_break("public/test", "frame", frame="this is not json {"),),
            (loss("malformed_frame", AT_ONCE),),
        ),
        UpstreamFault(
            "test_binary",
            (_break("public/test", "frame", frame="\x00\xff binary", binary=True),),
            (loss("malformed_frame", AT_ONCE),),
        ),
        UpstreamFault(
            "test_delay",
            ({"op": "delay_next", "method": "public/test", "seconds": 2 * rt + 2},),
            (loss("request_timeout", rt),),
        ),
        UpstreamFault(
            "test_13028",
            (_fail("public/test", 13028),),
            (),
            note="session.test_request_refused",
        ),
        UpstreamFault(
            "test_10028",
            (_fail("public/test", 10028, close_after=True),),
            (loss("rpc_error", AT_ONCE, "rate_limited"),),
        ),
        UpstreamFault("cod_drift", ({"op": "misreport_cod"},), (), note="session.cod_drift"),
        # An engine's order in flight when the link breaks: a relayed request has no timeout of
        # its own, so a silent link is the watchdog's to find (test_fault_matrix's rules).
        UpstreamFault(
            "buy_silence",
            (_break("private/buy", "silence"),),
            (Loss(frozenset({"heartbeat_silence", "request_timeout"}), "transient", silence),),
            provoke=True,
        ),
        UpstreamFault("buy_rst", (_break("private/buy", "reset"),), (dropped,), provoke=True),
        UpstreamFault(
            "buy_10028",
            (_fail("private/buy", 10028, close_after=True),),
            (loss("closed_by_server", AT_ONCE, "rate_limited"),),
            provoke=True,
        ),
    ]
    # Faults that meet the reconnect: the link is reset first, then the next attempt breaks.
    then: list[tuple[str, Op, tuple[Loss, ...]]] = [
        ("hs_blackhole", _hs("blackhole"), (loss("connect_timeout", rt),)),
        ("hs_stall", _hs("stall"), (loss("connect_timeout", rt),)),
        ("hs_reset", _hs("reset"), (loss("connect_timeout", rt),)),
        ("hs_delay", _hs("delay", seconds=2 * rt), (loss("connect_timeout", rt),)),
        ("hs_garbage", _hs("garbage"), (loss("handshake_failed", AT_ONCE),)),
        (
            "refuse_429x3",
            {"op": "refuse_handshakes", "n": 3, "status": 429},
            (loss("handshake_rejected", AT_ONCE),) * 3,
        ),
        (
            "refuse_503",
            {"op": "refuse_handshakes", "n": 1, "status": 503},
            (loss("handshake_rejected", AT_ONCE),),
        ),
        ("hello_13028", _fail("public/hello", 13028), (loss("rpc_error", AT_ONCE),)),
        (
            "hello_10028",
            _fail("public/hello", 10028, close_after=True),
            (loss("rpc_error", AT_ONCE, "rate_limited"),),
        ),
        ("auth_13004", _fail("public/auth", 13004), (loss("rpc_error", AT_ONCE, "persistent"),)),
        ("auth_13009", _fail("public/auth", 13009), (loss("rpc_error", AT_ONCE, "persistent"),)),
        ("cod_misreport", {"op": "misreport_cod"}, (loss("cod_not_confirmed", AT_ONCE),)),
        (
            "cod_enable_rst",
            _break("private/enable_cancel_on_disconnect", "reset"),
            (dropped,),
        ),
        (
            "set_heartbeat_silence",
            _break("public/set_heartbeat", "silence"),
            (loss("request_timeout", rt),),
        ),
    ]
    for name, op, losses in then:
        faults.append(UpstreamFault(f"rst+{name}", (rst, op), (dropped, *losses), True))
    return {fault.name: fault for fault in faults}


def _break(method: str, how: str, **extra: Any) -> Op:
    return {"op": "break_next", "method": method, "how": how, **extra}


def _fail(method: str, code: int, *, close_after: bool = False) -> Op:
    return {"op": "fail_next", "method": method, "code": code, "close_after": close_after}


def _hs(how: str, seconds: float = 0.0) -> Op:
    return {"op": "break_handshakes", "n": 1, "how": how, "seconds": seconds}


LocalKind = Literal["vanish", "vanish_rst", "close", "silent", "logout"]
LOCAL_KINDS: Final[tuple[LocalKind, ...]] = ("vanish", "vanish_rst", "close", "silent", "logout")
_LOCAL_END: Final[dict[str, str]] = {
    "vanish": "client_closed",
    "vanish_rst": "client_closed",
    "close": "client_closed",
    "silent": "heartbeat_missed",
    "logout": "logout",
}


def local_bound(plan: Plan, kind: LocalKind) -> float:
    return (plan.local_silence if kind == "silent" else AT_ONCE) + plan.margin


# ---- the simulators, in this process or another -------------------------------------------------


@dataclass(frozen=True)
class ConnView:
    """The simulator's record of one connection, as far as the invariants need it."""

    id: int
    peer_port: int | None
    open: bool
    cod_enabled: bool
    cod_fired: bool
    logged_out: bool
    heartbeat: bool
    opened_at: float
    closed_at: float | None


@dataclass(frozen=True)
class OrderView:
    """One order as Deribit shows it, with the id of the connection that made it."""

    order_id: str
    label: str
    open: bool
    conn: int | None


@dataclass(frozen=True)
class SimView:
    """One simulator's connections, the faults it noted, and its account's orders."""

    conns: tuple[ConnView, ...]
    triggered: tuple[tuple[float, str, int | None], ...]
    orders: tuple[OrderView, ...]

    def at_port(self, port: int, when: float) -> ConnView | None:
        """The connection from client ``port`` that was open at ``when`` (ports are reused)."""
        found = [c for c in self.conns if c.peer_port == port and c.opened_at <= when + 0.5]
        return found[-1] if found else None


class SimHandle(Protocol):
    """One account's simulator: its URL, its faults, its view; times in this Trio run's."""

    url: str

    async def apply(self, ops: Sequence[Op], target: int | None) -> float: ...

    async def view(self) -> SimView: ...

    async def until_closed(self, prefix: str, timeout: float) -> bool: ...


class LocalSim:
    """A Simulator in this Trio run."""

    def __init__(self, sim: Simulator, client_id: str) -> None:
        self.sim, self.client_id = sim, client_id
        self.url = sim.url

    async def apply(self, ops: Sequence[Op], target: int | None) -> float:
        return await apply_ops(self.sim, ops, target)

    async def view(self) -> SimView:
        return sim_view(self.sim, self.client_id)

    async def until_closed(self, prefix: str, timeout: float) -> bool:
        """Whether every order labelled ``prefix...`` is closed within ``timeout``."""

        def closed() -> bool:
            summaries = self.sim.order_summaries(self.client_id)
            return not any(
                is_open and label.startswith(prefix) for _, label, is_open, _ in summaries
            )

        with trio.move_on_after(timeout):
            await self.sim.wait_for(closed)
        return closed()


async def apply_ops(sim: Simulator, ops: Sequence[Op], target: int | None) -> float:
    """Do ``ops`` to ``sim`` (``target``: the connection id a drop or silence acts on); return
    the Trio time the first took effect."""
    at = trio.current_time()
    live = {c.id: c for c in sim.connections if c.open}
    for op in ops:
        kind = op["op"]
        if kind in ("drop", "go_silent"):
            conn = live.get(target) if target is not None else None
            if conn is None:
                continue  # gone meanwhile: what follows still arms the reconnect
            at = trio.current_time()
            if kind == "go_silent":
                sim.go_silent(conn)
            else:
                code = int(op.get("code", 1000))
                await sim.drop(
                    conn, abrupt=bool(op.get("abrupt")), reset=bool(op.get("reset")), code=code
                )
        elif kind == "break_next":
            frame: str | bytes = op.get("frame", "")
            if op.get("binary"):
                frame = str(frame).encode("latin-1")
            sim.break_next(op["method"], op["how"], code=int(op.get("code", 1000)), frame=frame)
        elif kind == "fail_next":
            sim.fail_next(op["method"], int(op["code"]), close_after=bool(op["close_after"]))
        elif kind == "delay_next":
            sim.delay_next(op["method"], float(op["seconds"]))
        elif kind == "misreport_cod":
            sim.misreport_cod()
        elif kind == "refuse_handshakes":
            sim.refuse_handshakes(int(op["n"]), int(op["status"]))
        elif kind == "break_handshakes":
            sim.break_handshakes(int(op["n"]), op["how"], seconds=float(op["seconds"]))
        else:
            raise ValueError(f"unknown op {kind!r}")
    return at


def sim_view(sim: Simulator, client_id: str) -> SimView:
    """What the invariants read of ``sim`` (Trio times of the run it is in)."""
    conns = tuple(
        ConnView(
            c.id,
            c.peer_port,
            c.open,
            c.cod_enabled,
            c.cod_fired,
            c.logged_out,
            c.heartbeat_interval is not None,
            c.opened_at,
            c.closed_at,
        )
        for c in sim.connections
    )
    triggered = tuple((t.at, t.fault, t.conn) for t in sim.triggered)
    orders = tuple(OrderView(*summary) for summary in sim.order_summaries(client_id))
    return SimView(conns, triggered, orders)


def view_to_json(view: SimView) -> dict[str, Any]:
    """A SimView as JSON, for the bench's simulators in another process."""
    return dataclasses.asdict(view)


def view_from_json(data: Mapping[str, Any], shift: float) -> SimView:
    """A SimView sent by another process, its times moved into this run's clock."""

    def moved(t: float | None) -> float | None:
        return None if t is None else t + shift

    conns = []
    for c in data["conns"]:
        opened = moved(c["opened_at"])
        assert opened is not None
        conns.append(ConnView(**{**c, "opened_at": opened, "closed_at": moved(c["closed_at"])}))
    triggered = tuple((at + shift, fault, conn) for at, fault, conn in data["triggered"])
    orders = tuple(OrderView(**o) for o in data["orders"])
    return SimView(tuple(conns), triggered, orders)


# ---- the keeper's side, as far as the checks need it --------------------------------------------


def link_port(session: Session) -> int | None:
    """The client port of the session's link to Deribit, or None without one.

    The keeper shows no address of its link (nothing but a check like this needs one), so this
    reads the TCP stream the session's RpcConnection keeps (``_stream``), and only reads it.
    """
    stream = getattr(session.rpc, "_stream", None)
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        return int(stream.socket.getsockname()[1])
    except OSError:
        return None


def in_flight(session: Session) -> int:
    """Requests the session's link waits answers for (its repr says; 0 without a link)."""
    found = re.search(r"in_flight=(\d+)", repr(session.rpc)) if session.rpc else None
    return int(found.group(1)) if found else 0


def tokens_held(gateway: Gateway) -> int:
    """How many local tokens the gateway remembers (bounded by MAX_TOKENS by design)."""
    found = re.search(r"tokens=(\d+)", repr(gateway.auth))
    return int(found.group(1)) if found else 0


def task_groups() -> Counter[str]:
    """Every Trio task now, counted by the account (or part of the world) whose subtree it is
    in: tasks named ``session:X``/``gateway:X`` (the keeper's), ``sim:X``, ``engine:X``."""
    counts: Counter[str] = Counter()

    def walk(task: trio.lowlevel.Task, group: str) -> None:
        name = task.name
        for prefix, kind in (("session:", "keeper"), ("gateway:", "keeper")):
            if name.startswith(prefix):
                group = f"{kind}:{name[len(prefix) :]}"
        if name.startswith(("sim:", "engine:")):
            group = name.split(":", 1)[0] + ":" + name.split(":")[1]
        counts[group] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, group)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, "other")
    return counts


# The keeper's objects that hold what an account has: a leaked one keeps its buffers, tables
# and sockets alive. Counted after a full collection, every CENSUS_EVERY checks (a walk of the
# whole heap costs a few hundred milliseconds late in a soak).
CENSUS: Final = frozenset(
    {"Session", "Gateway", "LocalLink", "LinkOrders", "RpcConnection", "_Pending", "Relayed"}
    | {"WebSocketConnection", "SocketStream", "SSLStream", "socket", "_SocketType"}
)
CENSUS_EVERY: Final = 36


def census() -> dict[str, int]:
    """Live objects of the CENSUS classes, after ``gc.collect()``: what memory an account
    holds, counted by what holds it."""
    gc.collect()
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in CENSUS:
            counts[f"live:{name}"] += 1
    return dict(counts)


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None  # not Linux: the socket count comes from the tables alone


# ---- the engines --------------------------------------------------------------------------------

_IDS = itertools.count(1)
CHANNELS: Final = (
    "user.orders.BTC-PERPETUAL.raw",
    "user.orders.any.any.raw",
    "user.orders.future.ETH.raw",
    "user.portfolio.btc",
)


def _closed_after(closed: bool, seconds: float) -> str:
    return f"closed after {seconds:.1f}s" if closed else "never closed"


def heartbeats(slot: int) -> bool:
    """Whether the engine in ``slot`` asks for local heartbeats (only those can go silent
    unnoticed by TCP); one in three does, which keeps a virtual day quick."""
    return slot % 3 == 0


def _is_test_request(params: Any) -> bool:
    return isinstance(params, dict) and params.get("type") == "test_request"


def next_id() -> int | str:
    """Ids unique over the whole soak, integers and strings both, so a misrouted answer can
    never match a request of the engine that gets it."""
    n = next(_IDS)
    return n if n % 2 else f"s{n}"


@dataclass
class Sent:
    """One request an engine sent, and its answer once it came."""

    method: str
    params: dict[str, Any]
    answer: dict[str, Any] | None = None
    done: trio.Event = field(default_factory=trio.Event)


class EngineLink:
    """One local engine connection to a gateway: sends, reads, and checks everything it gets."""

    def __init__(
        self,
        world: World,
        account: int,
        slot: int,
        seq: int,
        ws: WebSocketConnection,
        stream: trio.SocketStream,
        port: int,
    ) -> None:
        self.world, self.account, self.slot, self.seq = world, account, slot, seq
        self.name = f"{account_name(account)}.{slot}.{seq}"
        self.prefix = self.name + "."
        self.ws, self.stream = ws, stream
        self.port = port  # its own end: how the gateway's link record is found
        self.sent: dict[int | str, Sent] = {}
        self.channels: set[str] = set()
        self.changing: Counter[str] = Counter()  # channels with a (un)subscribe in flight
        self.orders: dict[str, str] = {}  # open order id -> label, as this engine knows them
        self.heartbeats = False
        self.cod = False
        self.link_id: int | None = None
        self.answer_heartbeats = True
        self.closed = trio.Event()
        self.faulted: LocalKind | None = None
        self._labels = itertools.count(1)

    def violation(self, what: str) -> None:
        self.world.monitor.violation("f", f"{self.name}: {what}")

    async def read(self) -> None:
        try:
            while True:
                self._check(json.loads(await self.ws.get_message()))
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for sent in self.sent.values():
                sent.done.set()

    def _check(self, frame: dict[str, Any]) -> None:
        """(f) for one frame: an answer to an id this link sent, once; a notification on a channel
        it holds, of its own account."""
        if "id" in frame:
            sent = self.sent.get(frame["id"]) if isinstance(frame["id"], int | str) else None
            if sent is None:
                self.violation(f"an answer to id {frame['id']!r}, which it never sent")
                return
            if sent.answer is not None:
                self.violation(f"a second answer to id {frame['id']!r}")
                return
            sent.answer = frame
            self._check_answer(sent, frame)
            sent.done.set()
            return
        method, params = frame.get("method"), frame.get("params")
        if method == "heartbeat":
            if not self.heartbeats:
                self.violation("a heartbeat it never asked for")
            elif self.answer_heartbeats and _is_test_request(params):
                self.world.spawn(self.send, "public/test", {})
            return
        if method != "subscription" or not isinstance(params, dict):
            self.violation(f"an unexpected frame {str(frame)[:120]}")
            return
        channel = params.get("channel")
        if channel not in self.channels and not self.changing[str(channel)]:
            self.violation(f"a notification on {channel!r}, which it does not hold")
        data = params.get("data")
        if (
            isinstance(channel, str)
            and channel.startswith("user.orders.")
            and isinstance(data, dict)
        ):
            label = str(data.get("label", ""))
            if not label.startswith(account_name(self.account) + "."):
                self.violation(f"another account's order {label!r} on {channel}")
            if label.startswith(self.prefix) and data.get("order_state") not in ("open",):
                self.orders.pop(str(data.get("order_id")), None)

    def _check_answer(self, sent: Sent, frame: dict[str, Any]) -> None:
        """(f) the answer's content is this request's: the order it placed, edited or cancelled."""
        result = frame.get("result")
        if result is None:
            return  # an error: Deribit's (relayed) or the gateway's 13028; nothing to match
        method = sent.method
        if method in ("private/buy", "private/sell", "private/edit"):
            order = result.get("order", {}) if isinstance(result, dict) else {}
            if method == "private/edit":
                if order.get("order_id") != sent.params["order_id"]:
                    self.violation(f"an edit answered with order {order.get('order_id')!r}")
            elif order.get("label") != sent.params["label"]:
                self.violation(f"a {method} answered with label {order.get('label')!r}")
            if order.get("order_state") == "open":
                self.orders[str(order["order_id"])] = str(order.get("label"))
            else:
                self.orders.pop(str(order.get("order_id")), None)
        elif method == "private/cancel":
            if not isinstance(result, dict) or result.get("order_id") != sent.params["order_id"]:
                self.violation(f"a cancel of {sent.params['order_id']} answered with {result!r}")
            self.orders.pop(sent.params["order_id"], None)
        elif method == "private/get_open_orders_by_currency":
            for order in result if isinstance(result, list) else ():
                if not str(order.get("label", "")).startswith(account_name(self.account) + "."):
                    self.violation(f"another account's open order {order.get('label')!r}")
        elif method.endswith("/subscribe"):
            asked = set(sent.params["channels"])
            if not isinstance(result, list) or not set(result) <= asked:
                self.violation(f"subscribed to {result!r}, having asked for {sorted(asked)}")
            else:
                self.channels |= set(result)
        elif method.endswith("/unsubscribe") and isinstance(result, list):
            self.channels -= set(result)

    async def send(self, method: str, params: dict[str, Any]) -> Sent:
        """Send a request under a soak-wide unique id (left unanswered on a closed link)."""
        request_id = next_id()
        sent = self.sent[request_id] = Sent(method, params)
        frame = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        try:
            await self.ws.send_message(json.dumps(frame))
        except ConnectionClosed:
            sent.done.set()
        return sent

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """The result, or None for an error or a link that closed first. An answer must come
        within the silence rule (a relayed request has no timeout of its own: a dead upstream
        is found by the watchdog, and the gateway then closes the link)."""
        sent = await self.send(method, params or {})
        bound = (
            self.world.plan.silence + self.world.plan.request_timeout + 5 + self.world.plan.margin
        )
        with trio.move_on_after(bound):
            await sent.done.wait()
        if not sent.done.is_set() and not self.closed.is_set() and self.faulted is None:
            self.violation(f"no answer to {method} within {bound:g}s, the link still open")
        if sent.answer is None:
            return None
        return sent.answer.get("result")

    async def set_up(self, rng: random.Random) -> bool:
        """Authenticate, heartbeats, COD, subscriptions: as an engine does on (re)connecting."""
        client = engine(self.account, self.slot)
        secret = client.client_secret.reveal()
        if rng.random() < 0.5:
            ts, nonce = int(time.time() * 1000), secrets.token_hex(8)
            params: dict[str, Any] = {
                "grant_type": "client_signature",
                "client_id": client.client_id,
                "timestamp": ts,
                "nonce": nonce,
                "data": "",
                "signature": sign(secret, ts, nonce, ""),
            }
        else:
            params = {
                "grant_type": "client_credentials",
                "client_id": client.client_id,
                "client_secret": secret,
            }
        if await self.call("public/auth", params) is None:
            return False
        if heartbeats(self.slot):
            self.heartbeats = True
            if (
                await self.call(
                    "public/set_heartbeat", {"interval": self.world.plan.local_heartbeat}
                )
                is None
            ):
                return False
        self.cod = self.account % 2 == 0
        if not self.cod and self.slot % 2 == 0:
            if await self.call("private/enable_cancel_on_disconnect", {}) is None:
                return False
            self.cod = True
        wanted = sorted(rng.sample(CHANNELS, rng.randint(1, 3)))
        await self.subscribe(wanted)
        return not self.closed.is_set()

    async def subscribe(self, channels: list[str], *, method: str = "private/subscribe") -> None:
        self.changing.update(channels)
        try:
            await self.call(method, {"channels": channels})
        finally:
            self.changing.subtract(channels)

    async def act(self, rng: random.Random) -> None:
        """One thing an engine does: trade, look, or change what it listens to."""
        roll = rng.random()
        mine = sorted(self.orders)
        placing = roll < 0.35 or (roll < 0.65 and not mine)
        if placing and len(mine) < 6:
            await self.place(rng, "private/buy" if rng.random() < 0.7 else "private/sell")
        elif roll < 0.5 and not placing:
            order_id = rng.choice(mine)
            price = 40000.0 + 0.5 * rng.randint(0, 200)
            await self.call("private/edit", {"order_id": order_id, "amount": 10, "price": price})
        elif roll < 0.65:
            await self.call("private/cancel", {"order_id": rng.choice(mine)})
        elif roll < 0.75:
            await self.call("private/get_open_orders_by_currency", {"currency": "BTC"})
        elif roll < 0.9:
            held = sorted(self.channels)
            if held and rng.random() < 0.5:
                gone = [rng.choice(held)]
                self.changing.update(gone)
                try:
                    await self.call("private/unsubscribe", {"channels": gone})
                finally:
                    self.changing.subtract(gone)
            else:
                await self.subscribe([rng.choice(CHANNELS)])
        else:
            await self.call("public/get_time")

    async def place(self, rng: random.Random, side: str = "private/buy") -> None:
        """A resting limit order (a buy under the book, a sell over it), labelled as its own."""
        base = 40000.0 if side == "private/buy" else 60000.0
        params = {
            "instrument_name": "BTC-PERPETUAL",
            "amount": 10 * rng.randint(1, 5),
            "price": base + 0.5 * rng.randint(0, 200),
            "label": f"{self.prefix}{next(self._labels)}",
        }
        await self.call(side, params)

    async def inflict(self, kind: LocalKind) -> None:
        """The local fault: the engine vanishes, closes, hangs, or logs out."""
        self.faulted = kind
        if kind in ("vanish", "vanish_rst"):
            if kind == "vanish_rst":
                reset_on_close(self.stream)
            await trio.aclose_forcefully(self.stream)
        elif kind == "close":
            with trio.move_on_after(2):
                await self.ws.aclose(1000)
        elif kind == "silent":
            self.answer_heartbeats = False
        else:
            request_id = next_id()
            frame = {"jsonrpc": "2.0", "id": request_id, "method": "private/logout"}
            try:
                await self.ws.send_message(json.dumps(frame))
            except ConnectionClosed:
                pass


class Slot:
    """One engine's seat at a gateway: it connects, sets up, acts, and comes back after every
    end of its link."""

    def __init__(self, world: World, account: int, slot: int) -> None:
        self.world, self.account, self.slot = world, account, slot
        self.rng = random.Random(f"{world.plan.seed}:{account}:{slot}")
        self.link: EngineLink | None = None  # set up and not known to be ended
        self.links = 0
        self.fault_wanted: LocalKind | None = None
        self.fault_ready = trio.Event()

    @property
    def gateway(self) -> Gateway | None:
        return self.world.keeper.gateways.get(account_name(self.account))

    async def run(self) -> None:
        """Connect, live, and come back after every end, as an engine's reconnect loop does."""
        while True:
            gateway = self.gateway
            if gateway is None or gateway.port is None:
                await trio.sleep(1)
                continue
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
            except OSError:
                await trio.sleep(1)
                continue
            self.links += 1
            try:
                async with trio.open_nursery() as nursery:
                    ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/ws/api/v2")
                    port = int(stream.socket.getsockname()[1])
                    seat = (self.account, self.slot, self.links)
                    link = EngineLink(self.world, *seat, ws, stream, port)
                    nursery.start_soon(link.read)
                    await self._live(link, gateway)
                    nursery.cancel_scope.cancel()
            except* (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                pass  # refused or reset on the way in: try again, as an engine does
            finally:
                self.link = None
                self.world.monitor.poke()
                await trio.aclose_forcefully(stream)
            await trio.sleep(self.rng.uniform(0.2, 3.0))

    async def _live(self, link: EngineLink, gateway: Gateway) -> None:
        async with self.world.gate.busy():
            if not await link.set_up(self.rng):
                return
            link.link_id = next(
                (i for i, lk in gateway.links.items() if lk.peer.endswith(f":{link.port}")), None
            )
        self.link = link
        self.world.monitor.poke()
        while not link.closed.is_set():
            with trio.move_on_after(self.rng.expovariate(1 / self.world.plan.action_gap)):
                await link.closed.wait()
            if link.closed.is_set() or link.faulted is not None:
                break
            async with self.world.gate.busy():
                await link.act(self.rng)
        if link.faulted is not None:
            await self.world.monitor.local_fault_over(link)


class Gate:
    """Lets the checks pause every engine between two of its steps."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()
        self._busy = 0
        self._idle = trio.Event()

    def busy(self) -> _Busy:
        return _Busy(self)

    async def pause(self) -> None:
        """Stop engines from starting a step; return once none is in the middle of one."""
        self._open = trio.Event()
        while self._busy:
            self._idle = trio.Event()
            await self._idle.wait()

    def resume(self) -> None:
        self._open.set()


class _Busy:
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        await self._gate._open.wait()
        self._gate._busy += 1

    async def __aexit__(self, *_: object) -> None:
        self._gate._busy -= 1
        if not self._gate._busy:
            self._gate._idle.set()


# ---- the monitor --------------------------------------------------------------------------------


@dataclass
class AccountLog:
    """One account's session events, in order, with their Trio times."""

    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    attempt: int = 0  # the backoff attempt the last retry reported (0 after a stable link)
    retry_at: float | None = None
    retry_delay: float = 0.0
    lost: list[tuple[float, str, str]] = field(default_factory=list)  # (time, reason, severity)
    attempts: list[float] = field(default_factory=list)  # session.connecting times
    ready_reports: list[tuple[float, int | None, str]] = field(default_factory=list)


class Monitor:
    """Watches the keeper's events and collects every broken invariant, by letter."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.plan = world.plan
        self.violations: list[str] = []
        self.accounts: dict[str, AccountLog] = defaultdict(AccountLog)
        self.faults: Counter[str] = Counter()
        self.detections: dict[str, list[float]] = defaultdict(list)
        self.checks = 0
        self.baseline: dict[str, Any] | None = None
        self.worst: Counter[str] = Counter()  # largest excess over baseline seen, by measure
        self.superseded = 0
        self.local_cod_by_upstream = 0  # dead local links whose orders Deribit's COD took
        self._changed = trio.Event()

    def poke(self) -> None:
        """Something changed: wake every ``until``."""
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds: checked after every session or gateway event and
        every engine (re)connection, and every few seconds besides."""
        while not predicate():
            with trio.move_on_after(5):
                await self._changed.wait()

    def violation(self, letter: str, what: str) -> None:
        line = f"({letter}) t={trio.current_time():.1f}: {what}"
        if len(self.violations) < 200:
            self.violations.append(line)

    def watch(self, keeper: Keeper) -> None:
        for name, session in keeper.sessions.items():
            session.watch(partial(self._session_event, name))
        for name, gateway in keeper.gateways.items():
            gateway.watch(partial(self._gateway_event, name))

    def _session_event(
        self, account: str, session: Session, event: str, fields: Mapping[str, Any]
    ) -> None:
        now = trio.current_time()
        log = self.accounts[account]
        log.events.append((now, event, dict(fields)))
        self.poke()
        if event == "session.connecting":
            log.attempts.append(now)
            if log.retry_at is not None and now - log.retry_at < log.retry_delay - 0.002:
                self.violation(
                    "d",
                    f"{account} tried again {now - log.retry_at:.3f}s after a retry that "
                    f"said {log.retry_delay}s",
                )
            log.retry_at = None
        elif event == "session.lost":
            log.lost.append((now, str(fields["reason"]), str(fields["severity"])))
            if float(fields.get("uptime_s", 0)) >= STABLE_AFTER_S:
                log.attempt = 0
        elif event == "session.retry":
            self._check_retry(account, log, now, fields)
        elif event == "session.ready":
            log.ready_reports.append((now, link_port(session), "session.ready"))
        elif event == "session.unexpected_error":
            self.violation("b", f"{account}: session.unexpected_error")

    def _check_retry(
        self, account: str, log: AccountLog, now: float, fields: Mapping[str, Any]
    ) -> None:
        delay, attempt = float(fields["delay_s"]), int(fields["attempt"])
        severity = log.lost[-1][2] if log.lost else "transient"
        plan, eps = self.plan, 0.0015  # the event rounds delay_s to the millisecond
        if severity == "rate_limited":
            low, high = plan.backoff_max / 2, plan.backoff_max
        elif severity == "persistent":
            low, high = 0.9 * plan.backoff_max, plan.backoff_max
        else:
            exponent = min(attempt - 1, 64)
            low, high = 0.0, min(plan.backoff_max, plan.backoff_initial * 2.0**exponent)
        if not low - eps <= delay <= high + eps:
            self.violation(
                "d", f"{account}: a {severity} retry of {delay}s, outside [{low}, {high}]"
            )
        if attempt != log.attempt + 1:
            self.violation(
                "d", f"{account}: retry attempt {attempt}, the policy says {log.attempt + 1}"
            )
        log.attempt = attempt
        log.retry_at, log.retry_delay = now, delay

    def _gateway_event(
        self, account: str, _gateway: Gateway, event: str, fields: Mapping[str, Any]
    ) -> None:
        self.poke()
        if event == "gateway.unexpected_error":
            self.violation("b", f"{account}: gateway.unexpected_error")
        elif event == "gateway.client_disconnected":
            self.world.link_ended(account, fields)

    def sample_readiness(self) -> None:
        """Note every account reported ready right now, by each hook, for the COD check."""
        keeper = self.world.keeper
        line = status_line(keeper.sessions)
        ready_count = int(line.split("/", 1)[0]) if "/" in line else 0
        for name, session in keeper.sessions.items():
            snapshot = session.snapshot()
            if snapshot["ready"]:
                self.accounts[name].ready_reports.append(
                    (trio.current_time(), link_port(session), "/status")
                )
            if session.state.value == "ready":  # what the STATUS line counts
                self.accounts[name].ready_reports.append(
                    (trio.current_time(), link_port(session), "sd_notify STATUS")
                )
        if ready_count != sum(s.state.value == "ready" for s in keeper.sessions.values()):
            self.violation("a", f"sd_notify STATUS {line!r} disagrees with the states")

    async def local_fault_over(self, link: EngineLink) -> None:
        """A hung engine leaves once the gateway has let it go (it reads nothing more)."""
        with trio.move_on_after(self.plan.local_silence * 3 + 10):
            await link.closed.wait()


# ---- the world ----------------------------------------------------------------------------------


@dataclass
class PendingLocal:
    """A local fault made, waiting for the gateway to notice it."""

    link: EngineLink
    kind: LocalKind
    at: float
    done: trio.Event = field(default_factory=trio.Event)


class World:
    """Everything a soak runs, and the loop of rounds."""

    def __init__(
        self,
        plan: Plan,
        sims: Sequence[SimHandle],
        nursery: trio.Nursery,
    ) -> None:
        self.plan, self.sims, self.nursery = plan, list(sims), nursery
        self.keeper = Keeper(
            keeper_config(plan, [s.url for s in sims]), rng=random.Random(plan.seed)
        )
        self.monitor = Monitor(self)
        self.gate = Gate()
        self.slots = [Slot(self, a, s) for a in range(plan.accounts) for s in range(plan.clients)]
        self.catalogue = upstream_faults(plan)
        self.pending_local: dict[tuple[str, int], PendingLocal] = {}
        self.dead_cod_links: set[str] = set()  # label prefixes of links whose local COD fired
        self.expected_attempts: Counter[str] = Counter()
        self.started = time.monotonic()

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self.nursery.start_soon(fn, *args)

    async def start(self) -> None:
        """Start the keeper and the engines; return once every account is ready and every engine set
        up."""
        await self.nursery.start(partial(self.keeper.run, handle_signals=False))
        self.monitor.watch(self.keeper)
        for slot in self.slots:
            self.nursery.start_soon(
                slot.run, name=f"engine:{account_name(slot.account)}:{slot.slot}"
            )
        self.nursery.start_soon(self._sample_readiness)
        await self._until(self._settled, self.plan.settle_s, "the start")
        # Attempts are counted from here: whether a session's first one comes before or after
        # the watch began is the scheduler's choice, and the count must replay with the seed.
        for log in self.monitor.accounts.values():
            log.attempts.clear()

    async def _sample_readiness(self) -> None:
        """Every few seconds, note each hook that reports an account ready (checked for COD
        against the simulators' records at the next check)."""
        while True:
            await trio.sleep(20.0)
            self.monitor.sample_readiness()

    async def _until(self, predicate: Callable[[], bool], timeout: float, what: str) -> bool:
        with trio.move_on_after(timeout):
            await self.monitor.until(predicate)
            return True
        self.monitor.violation("b", f"{what}: not settled within {timeout:g}s: {self._unsettled()}")
        return False

    def _settled(self) -> bool:
        return not self._unsettled()

    def _unsettled(self) -> str:
        keeper = self.keeper
        waiting = [n for n, s in keeper.sessions.items() if not s.ready]
        waiting += [n for n, g in keeper.gateways.items() if g.port is None]
        slots = [f"{account_name(s.account)}.{s.slot}" for s in self.slots if s.link is None]
        pending = [f"{a}:{i}" for (a, i) in self.pending_local]
        return ", ".join(waiting + slots + pending)

    def link_ended(self, account: str, fields: Mapping[str, Any]) -> None:
        """A gateway let a local link go: was it a fault we made, in time, and its COD?"""
        now = trio.current_time()
        link_id = fields.get("link")
        pending = self.pending_local.pop((account, int(link_id)), None) if link_id else None
        reason = str(fields.get("reason"))
        if pending is None:
            return
        pending.done.set()
        link = pending.link
        if reason in ("upstream_lost", "upstream_restarted"):
            self.monitor.superseded += 1  # the upstream went first; its COD covers the orders
            return
        expected = _LOCAL_END[pending.kind]
        took = now - pending.at
        self.monitor.detections[f"local:{pending.kind}"].append(took)
        if reason != expected:
            self.monitor.violation("b", f"{link.name}: {pending.kind} ended as {reason}")
        bound = local_bound(self.plan, pending.kind)
        if took > bound + FLOAT_NOISE:
            self.monitor.violation(
                "b", f"{link.name}: {pending.kind} noticed after {took:.2f}s, bound {bound:g}s"
            )
        if link.cod and reason in ("client_closed", "heartbeat_missed"):
            self.dead_cod_links.add(link.prefix)
            self.spawn(self._local_cod, link, pending.kind)

    async def _local_cod(self, link: EngineLink, kind: LocalKind) -> None:
        """The dead link's orders must all be closed within LOCAL_COD_S of the gateway noticing;
        if not, say how late they were (or that they never were) and what the link was doing."""
        sim, began = self.sims[link.account], trio.current_time()
        if await sim.until_closed(link.prefix, LOCAL_COD_S + self.plan.margin):
            return
        view = await sim.view()
        left = [o.label for o in view.orders if o.open and o.label.startswith(link.prefix)]
        pending = sorted({s.method for s in link.sent.values() if s.answer is None})
        known = sorted(link.orders.values())
        # An upstream link that died unnoticed swallows local COD's cancels; then Deribit's COD
        # cancels the orders once the keeper notices, within that hop's own bound, (b)'s
        # business: the README's first row. Anything else is late.
        upstream_bound = max(self.plan.silence, self.plan.request_timeout) + self.plan.margin
        late = await sim.until_closed(link.prefix, upstream_bound)
        if late:
            after = await sim.view()
            conns = {c.id: c for c in after.conns}
            mine = [o for o in after.orders if o.label in left]
            ended = [conns.get(o.conn) if o.conn is not None else None for o in mine]
            if all(c is not None and c.cod_fired for c in ended):  # open, until its record ends
                self.monitor.local_cod_by_upstream += 1
                return
        if not late:
            late = await sim.until_closed(link.prefix, 120.0)
        self.monitor.violation(
            "c",
            f"{link.name} ({kind}): orders {left} still open {LOCAL_COD_S:g}s after its local "
            f"COD fired; {_closed_after(late, trio.current_time() - began)}"
            f"; unanswered at its end: {pending}; known to it: {known}",
        )

    # ---- one round ----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.check(0)
        for number in range(1, self.plan.rounds + 1):
            began = trio.current_time()
            await self.round(number)
            await self.check(number)
            rest = began + self.plan.round_s - trio.current_time()
            if rest > 0:
                await trio.sleep(rest)
            if len(self.monitor.violations) >= 200:
                break

    async def round(self, number: int) -> None:
        """Inject this round's faults (drawn from the seed and the round alone, so they replay),
        then settle."""
        rng = random.Random(f"{self.plan.seed}:round:{number}")
        names = list(self.catalogue)
        async with trio.open_nursery() as faults:
            for index in range(self.plan.accounts):
                if rng.random() < self.plan.upstream_p:
                    fault = self.catalogue[rng.choice(names)]
                    at = rng.uniform(0, self.plan.act_s)
                    faults.start_soon(self._upstream, index, fault, at)
            for slot in self.slots:
                if rng.random() < self.plan.local_p:
                    kinds = [k for k in LOCAL_KINDS if k != "silent" or heartbeats(slot.slot)]
                    kind, at = rng.choice(kinds), rng.uniform(0, self.plan.act_s)
                    faults.start_soon(self._local, slot, kind, at)
        await self._until(self._settled, self.plan.settle_s, f"round {number}")

    async def _upstream(self, index: int, fault: UpstreamFault, delay: float) -> None:
        """Make one upstream fault on a ready account, wait for its outcome, and judge it (b)."""
        await trio.sleep(delay)
        name = account_name(index)
        session = self.keeper.sessions[name]
        if not session.ready:
            return  # not ready: its last fault is not over, nothing to aim at
        log, sim = self.monitor.accounts[name], self.sims[index]
        before = await sim.view()
        target = before.at_port(link_port(session) or -1, trio.current_time())
        lost_before, seen_before = len(log.lost), len(before.triggered)
        events_before = len(log.events)
        if target is None and fault.at_once:
            self.monitor.violation("a", f"{name} is ready, but Deribit has no record of its link")
            return
        at = await sim.apply(fault.ops, None if target is None else target.id)
        if fault.provoke:
            self._provoke(index)
        self.monitor.faults[f"upstream:{fault.name}"] += 1
        self.expected_attempts[name] += len(fault.losses)
        wanted = len(fault.losses)
        window = self.plan.settle_s - self.plan.act_s
        with trio.move_on_after(window):
            await self.monitor.until(
                lambda: len(log.lost) - lost_before >= wanted and session.ready
            )
            if fault.note is not None:
                await self.monitor.until(
                    lambda: any(e == fault.note for _, e, _ in log.events[events_before:])
                )
            if fault.name == "cod_drift":
                await self.monitor.until(
                    lambda: any(
                        e == "session.ready" and "repaired" in f
                        for _, e, f in log.events[events_before:]
                    )
                )
            # a kept link: nothing may be lost for a silence limit after the fault took effect
            if not fault.losses:
                await trio.sleep(self.plan.silence)
        after = await sim.view()
        self._check_orders([after], local=False)
        self._judge(
            name,
            fault,
            at,
            log.lost[lost_before:],
            after.triggered[seen_before:],
            log.events[events_before:],
        )

    def _provoke(self, index: int) -> None:
        """Have one of the account's engines place an order now, into the armed fault."""
        engines = [s.link for s in self.slots if s.account == index and s.link is not None]
        if engines:
            link = engines[0]
            self.spawn(link.place, random.Random(f"{self.plan.seed}:provoke:{link.name}"))

    def _judge(
        self,
        name: str,
        fault: UpstreamFault,
        at: float,
        lost: list[tuple[float, str, str]],
        triggered: Sequence[tuple[float, str, int | None]],
        events: list[tuple[float, str, dict[str, Any]]],
    ) -> None:
        moments = ([at] if fault.at_once else []) + [t for t, _, _ in triggered]
        where = f"{name} {fault.name}"
        if len(lost) != len(fault.losses):
            reasons = [r for _, r, _ in lost]
            self.monitor.violation("b", f"{where}: lost {reasons}, expected {len(fault.losses)}")
        noted = [t for t, e, _ in events if e == fault.note]
        if fault.note is not None and not noted:
            self.monitor.violation("b", f"{where}: no {fault.note}")
        elif noted and moments:
            self.monitor.detections[f"kept:{fault.name}"].append(noted[0] - moments[0])
        if len(moments) < len(fault.losses):
            self.monitor.violation("b", f"{where}: took effect {len(moments)} times, {moments}")
        parts = fault.name.replace("rst+", "drop_rst+").split("+")
        steps = zip(lost, fault.losses, moments, strict=False)
        for step, ((when, reason, severity), expected, moment) in enumerate(steps):
            took = when - moment
            kind = parts[0] if step == 0 else parts[-1]
            self.monitor.detections[f"upstream:{kind}"].append(took)
            if reason not in expected.reasons or severity != expected.severity:
                self.monitor.violation(
                    "b",
                    f"{where}: lost as {reason}/{severity}, "
                    f"expected {sorted(expected.reasons)}/{expected.severity}",
                )
            if not -FLOAT_NOISE <= took <= expected.bound + FLOAT_NOISE:
                self.monitor.violation(
                    "b", f"{where}: {reason} after {took:.6f}s, bound {expected.bound:g}s"
                )

    async def _local(self, slot: Slot, kind: LocalKind, delay: float) -> None:
        """Make one local fault on a set-up engine; ``link_ended`` judges it when the gateway
        notices."""
        await trio.sleep(delay)
        link = slot.link
        name = account_name(slot.account)
        if link is None or link.link_id is None or link.closed.is_set() or link.faulted:
            return
        pending = PendingLocal(link, kind, trio.current_time())
        self.pending_local[(name, link.link_id)] = pending
        self.monitor.faults[f"local:{kind}"] += 1
        await link.inflict(kind)
        with trio.move_on_after(local_bound(self.plan, kind) + 30):
            await pending.done.wait()
        if not pending.done.is_set():
            self.pending_local.pop((name, link.link_id), None)
            if not link.closed.is_set() or kind == "silent":
                self.monitor.violation("b", f"{link.name}: {kind} never noticed")

    # ---- the checks ---------------------------------------------------------------------------

    async def check(self, number: int) -> None:
        """Pause every engine, let the world go quiet, and check what must hold between faults."""
        self.monitor.checks += 1
        for _ in range(5):  # settled, then paused: an engine back just now has set up whole
            await self._until(self._settled, self.plan.settle_s, f"check {number}")
            await self.gate.pause()
            await trio.sleep(2)  # the last answers' notifications, background unsubscribes
            if self._settled():
                break
            self.gate.resume()
        try:
            self.monitor.sample_readiness()
            views = [await sim.view() for sim in self.sims]
            self._check_cod(views)
            self._check_orders(views)
            self._check_tables(views)
            self._check_storm()
            await self._check_readyz()
            self._check_leaks(number)
        finally:
            self.gate.resume()

    def _check_reports(self, name: str, view: SimView) -> None:
        """Every readiness reported since the last check was on a link Deribit says has COD."""
        log = self.monitor.accounts[name]
        for when, port, hook in log.ready_reports:
            conn = view.at_port(port, when) if port is not None else None
            if conn is None or not conn.cod_enabled:
                self.monitor.violation(
                    "a",
                    f"{name} reported ready by {hook} at {when:.1f} on a link without COD ({conn})",
                )
        log.ready_reports.clear()

    def _check_cod(self, views: Sequence[SimView]) -> None:
        """(a) at rest: each account's link is open with COD and heartbeats on, and its only one."""
        for index, view in enumerate(views):
            name = account_name(index)
            self._check_reports(name, view)
            session = self.keeper.sessions[name]
            port = link_port(session)
            current = view.at_port(port, trio.current_time()) if port is not None else None
            if current is None or not (current.open and current.cod_enabled and current.heartbeat):
                self.monitor.violation("a", f"{name} ready on {current}")
            others = [c.id for c in view.conns if c.open and c is not current]
            if others:
                self.monitor.violation("e", f"{name}: other links open on Deribit: {others}")

    def _check_orders(self, views: Sequence[SimView], *, local: bool = True) -> None:
        """(c) no order made without COD, none open on a connection whose COD fired (checked
        after every upstream fault, and at every check), none left by a local link whose local
        COD fired (at the checks: a link may have died less than its second ago otherwise)."""
        for view in views:
            conns = {c.id: c for c in view.conns}
            for order in view.orders:
                conn = conns.get(order.conn) if order.conn is not None else None
                if conn is None or not conn.cod_enabled:
                    self.monitor.violation("c", f"order {order.label} made on a link without COD")
                elif order.open and conn.cod_fired:
                    self.monitor.violation(
                        "c", f"order {order.label} outlived its dead link {conn.id}"
                    )
                elif (
                    local
                    and order.open
                    and order.label.rsplit(".", 1)[0] + "." in self.dead_cod_links
                ):
                    self.monitor.violation(
                        "c", f"order {order.label} outlived its local link's COD"
                    )

    def _check_tables(self, views: Sequence[SimView]) -> None:
        """(e) the gateway's tables hold exactly what the live engines hold: links, channels, order
        books, nothing in flight."""
        for index, view in enumerate(views):
            name = account_name(index)
            gateway = self.keeper.gateways[name]
            session = self.keeper.sessions[name]
            links = {
                s.link.link_id: s.link
                for s in self.slots
                if s.account == index and s.link and s.link.link_id is not None
            }
            if set(gateway.links) != set(links):
                self.monitor.violation(
                    "e",
                    f"{name}: gateway links {sorted(gateway.links)}, engines on {sorted(links)}",
                )
            open_by_label = Counter(o.label.rsplit(".", 1)[0] + "." for o in view.orders if o.open)
            held: set[str] = set()
            for link_id, local in gateway.links.items():
                engine_link = links.get(link_id)
                if engine_link is None:
                    continue
                held |= engine_link.channels
                if local.channels != engine_link.channels:
                    self.monitor.violation(
                        "e",
                        f"{engine_link.name}: gateway holds {sorted(local.channels)}, "
                        f"engine {sorted(engine_link.channels)}",
                    )
                if len(local.orders) != open_by_label[engine_link.prefix]:
                    self.monitor.violation(
                        "e",
                        f"{engine_link.name}: gateway books {len(local.orders)} orders, "
                        f"{open_by_label[engine_link.prefix]} open",
                    )
            upstream = set(gateway.snapshot()["upstream_channels"])
            if upstream != held:
                self.monitor.violation(
                    "e", f"{name}: upstream channels {sorted(upstream)}, held {sorted(held)}"
                )
            if any(len(book) for book in gateway.client_orders.values()):
                self.monitor.violation("e", f"{name}: HTTP order books not empty")
            if in_flight(session):
                self.monitor.violation(
                    "e", f"{name}: {in_flight(session)} requests in flight at rest"
                )
            if tokens_held(gateway) > MAX_TOKENS:
                self.monitor.violation("e", f"{name}: {tokens_held(gateway)} tokens held")

    def _check_storm(self) -> None:
        """(d) no more connection attempts than the faults explain (one per loss they cause)."""
        for name, log in self.monitor.accounts.items():
            attempts = len(log.attempts)
            if attempts > self.expected_attempts[name]:
                self.monitor.violation(
                    "d",
                    f"{name}: {attempts} attempts, "
                    f"the faults explain {self.expected_attempts[name]}",
                )
                self.expected_attempts[name] = attempts  # report each excess once

    async def _check_readyz(self) -> None:
        """(a) /readyz at rest says every account is ready; each is checked for COD like every other
        report."""
        port = self.keeper.http_port
        if port is None:
            return
        status, body = await http_get(port, "/readyz")
        if status != 200 or body.get("ready") is not True:
            self.monitor.violation("a", f"/readyz {status} {body} at rest")
        for name, session in self.keeper.sessions.items():
            if body.get("accounts", {}).get(name) == "ready":
                self.monitor.accounts[name].ready_reports.append(
                    (trio.current_time(), link_port(session), "/readyz")
                )

    def _check_leaks(self, number: int) -> None:
        """(e) tasks per account, file descriptors and the census against the first check's
        baseline."""
        measures: dict[str, int] = dict(task_groups())
        if number % CENSUS_EVERY == 0 or number == self.plan.rounds:
            measures.update(census())
        fds = open_fds()
        if fds is not None:
            measures["fds"] = fds
        if self.monitor.baseline is None:
            self.monitor.baseline = measures
            return
        for key, value in measures.items():
            base = self.monitor.baseline.get(key, 0)
            excess = value - base
            self.monitor.worst[key] = max(self.monitor.worst[key], excess)
            slack = FD_SLACK if key == "fds" else TASK_SLACK
            if excess > slack:
                self.monitor.violation("e", f"check {number}: {key} at {value}, baseline {base}")

    # ---- the report -----------------------------------------------------------------------------

    def progress(self) -> str:
        """One line of counters, for a long real-time run to print every minute."""
        m = self.monitor
        detections = {
            hop: sum(len(ts) for k, ts in m.detections.items() if k.startswith(hop))
            for hop in ("upstream", "local")
        }
        worst = max((t for ts in m.detections.values() for t in ts), default=0.0)
        return (
            f"t={time.monotonic() - self.started:.0f}s checks={m.checks} "
            f"faults={sum(m.faults.values())} detections={detections} worst={worst:.2f}s "
            f"attempts={sum(len(log.attempts) for log in m.accounts.values())} "
            f"engine_links={sum(s.links for s in self.slots)} violations={len(m.violations)}"
        )

    def summary(self) -> str:
        """Faults per kind, detections and the worst per hop and kind, attempts, leaks: printed by
        the soak."""
        m = self.monitor
        lines = [
            f"soak seed={self.plan.seed} hours={self.plan.hours:g} accounts={self.plan.accounts} "
            f"engines={len(self.slots)} rounds={m.checks - 1} "
            f"wall={time.monotonic() - self.started:.1f}s violations={len(m.violations)}",
            "faults injected: " + ", ".join(f"{k}={v}" for k, v in sorted(m.faults.items())),
        ]
        for hop in ("upstream", "local"):
            times = [t for k, ts in m.detections.items() if k.startswith(hop) for t in ts]
            worst = {
                k.split(":", 1)[1]: max(ts)
                for k, ts in m.detections.items()
                if k.startswith(hop) and ts
            }
            lines.append(
                f"{hop}: {len(times)} detections, max {max(times, default=0):.2f}s; per kind: "
                + ", ".join(f"{k}={v:.2f}" for k, v in sorted(worst.items()))
            )
        attempts = sum(len(log.attempts) for log in m.accounts.values())
        lines.append(
            f"connection attempts={attempts}, local faults superseded by upstream losses="
            f"{m.superseded}, local COD overtaken by an upstream loss={m.local_cod_by_upstream}, "
            f"engine links={sum(s.links for s in self.slots)}"
        )
        base = m.baseline or {}
        lines.append(
            "leaks (max excess over baseline): "
            + ", ".join(f"{k}={m.worst[k]:+d}/{base.get(k)}" for k in sorted(m.worst))
        )
        return "\n".join(lines)


async def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET ``path`` from the keeper's endpoint on ``port``: the status and the JSON body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        raw = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body or b"{}")


def seed_from_env(environ: Mapping[str, str]) -> int:
    """``SOAK_SEED`` if set, else a fresh one (printed, so any run can be replayed)."""
    given = environ.get("SOAK_SEED")
    if given:
        return int(given)
    return int(hashlib.sha256(os.urandom(8)).hexdigest()[:8], 16)
