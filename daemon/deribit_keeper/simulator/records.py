"""What the simulator's method modules share: the connection record, a call and its reply.

``SimConnection`` is the record tests read; ``LinkState`` holds what tests must not see (the
access token); a method gets a ``Call`` and returns a ``Reply`` whose ``effect``, ``events`` and
``notices`` tell the connection what to do on the wire besides answering. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from deribit_keeper.rest import websocket_only_fault

from .orders import OrderEvent


@dataclass(eq=False)
class SimConnection:
    """The record of one accepted WebSocket, for tests to read (never to write).

    ``cod_fired`` is set when the connection ended while its COD was active and it had not logged
    out: the moment Deribit cancels the orders this connection created, whose ids then are in
    ``cod_cancelled`` (in creation order). ``abrupt`` means no close handshake; ``reset``
    that the server's end was a TCP reset. ``channels`` are the subscriptions it holds (or held
    when it ended), in the order first subscribed. Times are Trio time. ``peer_port`` is the
    client's end of the TCP connection, so a test can tell which of its sockets this record is
    (a soak maps each keeper link to the simulator's view of it). ``repr`` leaves out
    ``requests``, whose params may hold a secret.
    """

    id: int
    opened_at: float
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list, repr=False)
    client_id: str | None = None
    cod_enabled: bool = False
    heartbeat_interval: float | None = None
    test_requests_sent: int = 0
    test_requests_answered: int = 0
    channels: list[str] = field(default_factory=list)
    open: bool = True
    closed_by: Literal["client", "server"] | None = None
    close_code: int | None = None
    abrupt: bool = False
    reset: bool = False  # the server ended it with a TCP reset (RST), not a FIN
    logged_out: bool = False
    cod_fired: bool = False
    cod_cancelled: list[str] = field(default_factory=list)
    closed_at: float | None = None
    peer_port: int | None = None  # the client's TCP port: which of a client's links this is

    def methods(self) -> list[str]:
        """The methods of the well-formed requests received, in arrival order."""
        return [method for method, _ in self.requests]


@dataclass(slots=True)
class LinkState:
    """Per-connection state that is nobody's business but the simulator's."""

    access_token: str | None = field(default=None, repr=False)
    test_outstanding: bool = False  # a test_request was sent and no public/test came since


class Effect(Enum):
    """What the connection must do on the wire besides sending the answer."""

    NONE = "none"
    HEARTBEAT_CHANGED = "heartbeat_changed"  # (re)start or stop heartbeats per the record
    CLOSE_WITHOUT_ANSWER = "close_without_answer"  # private/logout
    SUBSCRIPTIONS_CHANGED = "subscriptions_changed"  # start or stop the ticker per the record


@dataclass(frozen=True, slots=True)
class Reply:
    """A method's result and what goes with it.

    Attributes:
        result: the ``result`` member of the answer.
        effect: what the connection must do besides answering.
        events: order changes, queued (before the answer is sent) on every subscribed
            connection of each order's account, this one included.
        notices: ``(channel, data)`` notifications for this connection alone, queued after the
            answer is sent (the portfolio a ``user.portfolio.*`` subscription starts with).
    """

    result: Any
    effect: Effect = Effect.NONE
    events: tuple[OrderEvent, ...] = ()
    notices: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Call:
    """One request as a method sees it: who it came over, and what time it is.

    A request over HTTP comes over no connection: ``conn`` is None, ``link`` is a fresh
    ``LinkState`` thrown away with the answer, and ``authorized_as`` is the account its
    ``Authorization`` header proved (None without one). Methods that act on a connection take it
    through ``connection()``, which refuses such a request.
    """

    params: dict[str, Any]
    conn: SimConnection | None
    link: LinkState
    now: float  # Trio time
    wall_now: float  # epoch seconds
    authorized_as: str | None = None

    def connection(self) -> SimConnection:
        """The connection this request came over.

        Raises:
            RpcFault: the WebSocket-only refusal, for a request that came over HTTP.
        """
        if self.conn is None:
            raise websocket_only_fault()
        return self.conn
