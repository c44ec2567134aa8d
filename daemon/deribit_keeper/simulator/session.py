"""How each JSON-RPC method changes what the simulator knows: the ``Dispatcher``.

The Dispatcher answers the session methods itself (hello, test, auth, heartbeats, COD, logout)
and hands the rest to ``trading`` (orders, instruments) and ``subscriptions`` (channels). There
is no I/O here: a method returns a ``Reply`` (see ``records``) whose ``effect`` tells the
connection what to do on the wire besides answering (restart heartbeats, start or stop the
ticker, or close without answering after a logout) and whose ``events`` it publishes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from deribit_keeper.jsonrpc import (
    RpcFault,
    get_choice,
    get_int,
    get_number,
    get_str,
    invalid,
    opt_bool,
    opt_str,
)
from deribit_keeper.protocol import API_VERSION, HEARTBEAT_MIN_S, ErrorCode
from deribit_keeper.rest import websocket_only, websocket_only_fault

from .exchange import Exchange, Grant
from .faults import Faults
from .orders import OrderBook
from .records import Call, Effect, LinkState, Reply, SimConnection
from .subscriptions import SubscriptionMethods
from .trading import TradingMethods

COD_SCOPES: Final = ("connection", "account")
GRANT_TYPES: Final = ("client_credentials", "client_signature", "refresh_token")


class Dispatcher:
    """Answers requests: one private method per JSON-RPC method, looked up by name.

    Args:
        exchange: accounts, tokens and account-level COD, shared by all connections.
        faults: consulted for ``misreport_cod``; failures and delays are applied by the caller.
        book: every account's orders, shared by all connections.
    """

    def __init__(self, exchange: Exchange, faults: Faults, book: OrderBook) -> None:
        self._exchange = exchange
        self._faults = faults
        self._methods: dict[str, Callable[[Call], Reply]] = {
            "public/hello": self._hello,
            "public/test": self._test,
            "public/auth": self._auth,
            "public/set_heartbeat": self._set_heartbeat,
            "public/disable_heartbeat": self._disable_heartbeat,
            "private/enable_cancel_on_disconnect": self._enable_cod,
            "private/disable_cancel_on_disconnect": self._disable_cod,
            "private/get_cancel_on_disconnect": self._get_cod,
            "private/logout": self._logout,
        }
        self._methods.update(TradingMethods(book, self._client).methods())
        self._methods.update(SubscriptionMethods(self._client, self._maybe_client).methods())

    def handle(self, method: str, call: Call) -> Reply:
        """Answer one request, over a WebSocket or (``call.conn`` None) over HTTP.

        Raises:
            RpcFault: the Deribit error to answer with (-32601 for a method not simulated, and
                ``rest.websocket_only_fault()`` for a WebSocket-only method over HTTP).
        """
        handler = self._methods.get(method)
        if handler is None:
            raise RpcFault(ErrorCode.METHOD_NOT_FOUND)
        if call.conn is None and websocket_only(method, call.params):
            raise websocket_only_fault()
        return handler(call)

    def _client(self, call: Call) -> str:
        """The account a private request acts for, or 13009.

        The connection's own auth is used unless the request carries ``access_token``, which then
        must be valid itself (Deribit accepts either on a WebSocket). Over HTTP there is no
        connection auth: the ``Authorization`` header's account (``call.authorized_as``) stands
        in for it.
        """
        client_id = self._maybe_client(call)
        if client_id is None:
            raise RpcFault(ErrorCode.UNAUTHORIZED)
        return client_id

    def _maybe_client(self, call: Call) -> str | None:
        """Like ``_client``, but None when the request has no auth at all (13009 for bad auth)."""
        if "access_token" in call.params:
            return self._exchange.client_of(get_str(call.params, "access_token"), now=call.now)
        if call.conn is None:
            return call.authorized_as
        if call.link.access_token is None:
            return None
        return self._exchange.client_of(call.link.access_token, now=call.now)

    def _hello(self, call: Call) -> Reply:
        get_str(call.params, "client_name")
        get_str(call.params, "client_version")
        return Reply({"version": API_VERSION})

    @staticmethod
    def note_test_answer(link: LinkState, conn: SimConnection) -> None:
        """Any public/test answers an outstanding test_request, even one answered with an error:
        Deribit's heartbeat rule is about the client sending it, not about what it got back."""
        if link.test_outstanding:
            link.test_outstanding = False
            conn.test_requests_answered += 1

    def _test(self, call: Call) -> Reply:
        if call.conn is not None:  # over HTTP there is no heartbeat to answer
            self.note_test_answer(call.link, call.conn)
        if "expected_result" in call.params:
            get_choice(call.params, "expected_result", ("exception",))
            # (choice) the sheet names no code: 13028 temporarily_unavailable is a transient
            # server-side error, the class a client's error path must survive.
            raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE)
        return Reply({"version": API_VERSION})

    def _auth(self, call: Call) -> Reply:
        params = call.params
        grant_type = get_choice(params, "grant_type", GRANT_TYPES)
        opt_str(params, "scope", "")  # session scopes are not simulated: checked, then ignored
        grant: Grant
        if grant_type == "client_credentials":
            grant = self._exchange.grant_client_credentials(
                get_str(params, "client_id"),
                get_str(params, "client_secret"),
                now=call.now,
                wall_now=call.wall_now,
            )
        elif grant_type == "client_signature":
            grant = self._exchange.grant_client_signature(
                get_str(params, "client_id"),
                get_int(params, "timestamp"),
                get_str(params, "nonce"),
                get_str(params, "signature"),
                opt_str(params, "data", ""),
                now=call.now,
                wall_now=call.wall_now,
            )
        else:
            grant = self._exchange.grant_refresh_token(
                get_str(params, "refresh_token"), now=call.now, wall_now=call.wall_now
            )
        if call.conn is not None:  # over HTTP the tokens are all there is: nothing to remember
            self._authenticate_connection(call.conn, call.link, grant)
        return Reply(
            {
                "access_token": grant.access_token,
                "expires_in": grant.expires_in,
                "refresh_token": grant.refresh_token,
                "scope": "connection mainaccount",
                "token_type": "bearer",
                "enabled_features": [],
            }
        )

    def _authenticate_connection(self, conn: SimConnection, link: LinkState, grant: Grant) -> None:
        """Connection-scoped auth: later requests on ``conn`` act for the grant's account."""
        # (choice) The account is only known once the connection authenticates, so that is when
        # its COD takes the account setting; re-authenticating as the same account keeps it.
        if conn.client_id != grant.client_id:
            conn.cod_enabled = self._exchange.account_cod(grant.client_id)
        conn.client_id = grant.client_id
        link.access_token = grant.access_token

    def _set_heartbeat(self, call: Call) -> Reply:
        interval = get_number(call.params, "interval")
        if interval < HEARTBEAT_MIN_S:
            raise invalid("interval", f"must be at least {HEARTBEAT_MIN_S}")
        call.connection().heartbeat_interval = interval
        call.link.test_outstanding = False  # a new schedule starts with a clean slate
        return Reply("ok", Effect.HEARTBEAT_CHANGED)

    def _disable_heartbeat(self, call: Call) -> Reply:
        call.connection().heartbeat_interval = None
        call.link.test_outstanding = False
        return Reply("ok", Effect.HEARTBEAT_CHANGED)

    def _set_cod(self, call: Call, enabled: bool) -> Reply:
        client_id = self._client(call)
        if get_choice(call.params, "scope", COD_SCOPES, "connection") == "account":
            self._exchange.set_account_cod(client_id, enabled)
        else:
            call.connection().cod_enabled = enabled
        return Reply("ok")

    def _enable_cod(self, call: Call) -> Reply:
        return self._set_cod(call, True)

    def _disable_cod(self, call: Call) -> Reply:
        return self._set_cod(call, False)

    def _get_cod(self, call: Call) -> Reply:
        client_id = self._client(call)
        scope = get_choice(call.params, "scope", COD_SCOPES, "connection")
        if scope == "account":
            enabled = self._exchange.account_cod(client_id)
        else:
            enabled = call.connection().cod_enabled
        if self._faults.take_misreport():
            enabled = False
            conn_id = None if call.conn is None else call.conn.id
            self._faults.note(call.now, "misreport cod", conn_id)
        return Reply({"scope": scope, "enabled": enabled})

    def _logout(self, call: Call) -> Reply:
        # (choice) logout is private: without valid auth it is answered 13009 and nothing closes.
        self._client(call)
        invalidate = opt_bool(call.params, "invalidate_token", True)
        call.connection().logged_out = True
        if invalidate:
            token = call.params.get("access_token", call.link.access_token)
            if isinstance(token, str):
                self._exchange.revoke_session(token)
        return Reply(None, Effect.CLOSE_WITHOUT_ANSWER)
