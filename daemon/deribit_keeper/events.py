"""Every structured log event the keeper emits, by its stable name.

Operators alert on these names, so they never change without a note in the README. Paired outcomes
follow httpcore's ``.started``/``.complete``/``.failed`` idea: ``session.connecting`` ends in
``session.ready`` or ``session.lost``.
"""

from __future__ import annotations

from typing import Final

KEEPER_STARTED: Final = "keeper.started"
KEEPER_STOPPING: Final = "keeper.stopping"
KEEPER_STOPPED: Final = "keeper.stopped"
KEEPER_CRASHED: Final = "keeper.crashed"
KEEPER_RELOADED: Final = "keeper.reloaded"
KEEPER_RELOAD_FAILED: Final = "keeper.reload_failed"
KEEPER_HTTP_FAILED: Final = "keeper.http_failed"
KEEPER_CANCEL_ALL: Final = "keeper.cancel_all"  # the panic button: account, cancelled, source
KEEPER_CANCEL_ALL_REFUSED: Final = "keeper.cancel_all_refused"  # no or wrong admin token
KEEPER_CANCEL_ALL_FAILED: Final = "keeper.cancel_all_failed"  # authenticated, not done (status)

SESSION_CONNECTING: Final = "session.connecting"
SESSION_AUTHENTICATING: Final = "session.authenticating"
SESSION_ENABLING_COD: Final = "session.enabling_cod"
SESSION_READY: Final = "session.ready"
SESSION_LOST: Final = "session.lost"
SESSION_RETRY: Final = "session.retry"
SESSION_STOPPING: Final = "session.stopping"
SESSION_STOPPED: Final = "session.stopped"
SESSION_TOKEN_REFRESHED: Final = "session.token_refreshed"
SESSION_TOKEN_REFRESH_REFUSED: Final = "session.token_refresh_refused"
SESSION_TEST_REQUEST_ANSWERED: Final = "session.test_request_answered"
SESSION_UNEXPECTED_ERROR: Final = "session.unexpected_error"
SESSION_OBSERVER_FAILED: Final = "session.observer_failed"
SESSION_LOGOUT_FAILED: Final = "session.logout_failed"
SESSION_TEST_REQUEST_REFUSED: Final = "session.test_request_refused"
SESSION_HEARTBEAT_RESTARTED: Final = "session.heartbeat_restarted"  # heartbeats stopped; set again
SESSION_COD_DRIFT: Final = "session.cod_drift"  # COD found off behind the keeper's back
SESSION_COD_CHECK_FAILED: Final = "session.cod_check_failed"
SESSION_START_CANCEL_ALL: Final = "session.start_cancel_all"  # on_start: cancel_all, with the count

GATEWAY_LISTENING: Final = "gateway.listening"
GATEWAY_LISTEN_FAILED: Final = "gateway.listen_failed"
GATEWAY_CLIENT_CONNECTED: Final = "gateway.client_connected"
GATEWAY_CLIENT_AUTHENTICATED: Final = "gateway.client_authenticated"
GATEWAY_CLIENT_DISCONNECTED: Final = "gateway.client_disconnected"
GATEWAY_COD_FIRED: Final = "gateway.cod_fired"
GATEWAY_UPSTREAM_LOST: Final = "gateway.upstream_lost"
GATEWAY_STOPPED: Final = "gateway.stopped"
GATEWAY_OBSERVER_FAILED: Final = "gateway.observer_failed"
GATEWAY_UNEXPECTED_ERROR: Final = "gateway.unexpected_error"

SYSTEMD_NOTIFY_FAILED: Final = "systemd.notify_failed"
HTTP_LISTENING: Final = "http.listening"
HTTP_REQUEST: Final = "http.request"
HTTP_SERVER: Final = "http.server"  # hypercorn's own messages: startup lines, app errors

DEMO_FAULT: Final = "demo.fault"
