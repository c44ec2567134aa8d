"""One account's link to Deribit: the only place where its state changes.

    connect -> hello -> auth -> COD enable -> COD confirm -> set_heartbeat -> READY
    -> (answer test_requests, refresh the token, watch for silence) -> lost -> backoff -> again

The promise the keeper makes is about READY: a session enters it only after Deribit has confirmed
Cancel-On-Disconnect for this very connection, and leaves it the moment anything is wrong with the
link. A lost link is never repaired in place: the connection is dropped (Deribit then cancels the
orders COD protects) and a fresh one is built from the start, after a jittered backoff.

COD found off on a live link (``cod_guard``: someone turned it off behind the keeper's back) is
the one thing repaired in place: READY -> ENABLING_COD -> READY. Dropping the link instead would
fire COD only if it were still on, and leave the orders unprotected if it were not.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import Enum
from functools import partial
from typing import Any, Final

import trio

from . import __version__, auth, events
from .backoff import STABLE_AFTER_S, Backoff, Severity, classify
from .cod_guard import CodGuard, Drift, enable_cod
from .config import AccountConfig, ShutdownMode
from .errors import DeadLink, NotReady, RpcError, SessionLost
from .logs import enabled, get_logger
from .pacer import ConnectPacer
from .protocol import ErrorCode
from .rpc import OnAnswer, Relayed, Reply, RpcConnection, open_rpc_connection, result_of

Observer = Callable[["Session", str, Mapping[str, Any]], None]
Listener = Callable[[str, Any], None]  # (method, params) of a notification other than heartbeat
OnRequest = Callable[[str, float], None]  # (method, seconds until its answer arrived)

CLIENT_NAME: Final = "deribit-keeper"
LOGOUT_TIMEOUT_S: Final = 3.0  # private/logout has no answer; wait this long for Deribit's close


def quiet_limit(heartbeat_interval: float) -> float:
    """How long a READY link may stay silent before the keeper asks whether it is alive.

    Deribit sends a test_request every heartbeat interval, so a healthy link is never silent for
    longer than that; a tenth more absorbs a late heartbeat, so that a healthy link is hardly
    ever probed. Then a ``public/test`` goes out, which a live link answers.
    """
    return heartbeat_interval * 1.1


def silence_limit(heartbeat_interval: float) -> float:
    """How long a READY link may stay silent before it counts as dead: the probe sent at
    ``quiet_limit`` has a tenth of an interval (1 s at the 10 s minimum) to be answered.

    Waiting for the next heartbeat alone would find a link that died right after Deribit's
    last answer only 1.5 intervals later; the probe finds it by 1.2, wherever the silence
    starts.
    """
    return heartbeat_interval * 1.2


def _number(seconds: float) -> int | float:
    """A whole number of seconds as an int: ``10``, as Deribit's own examples send it."""
    return int(seconds) if float(seconds).is_integer() else seconds


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _count_of(result: Any) -> int:
    """The number a ``private/cancel_all`` answered (a list with ``detailed``: its length).

    Raises:
        SessionLost: the answer is neither, so the count cannot be told.
    """
    if isinstance(result, list):
        return len(result)
    if isinstance(result, int) and not isinstance(result, bool) and result >= 0:
        return result
    raise SessionLost("malformed_answer", "private/cancel_all answered without a count")


class SessionState(Enum):
    """Where one account's link stands. Only READY means COD is confirmed on a live link."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    ENABLING_COD = "enabling_cod"
    READY = "ready"
    STOPPING = "stopping"  # ending on request: logout sent or about to be, COD may no longer hold
    LOST = "lost"  # the link just ended; BACKOFF follows
    BACKOFF = "backoff"


_EVENT_OF: Final = {
    SessionState.STOPPED: events.SESSION_STOPPED,
    SessionState.CONNECTING: events.SESSION_CONNECTING,
    SessionState.AUTHENTICATING: events.SESSION_AUTHENTICATING,
    SessionState.ENABLING_COD: events.SESSION_ENABLING_COD,
    SessionState.READY: events.SESSION_READY,
    SessionState.STOPPING: events.SESSION_STOPPING,
    SessionState.LOST: events.SESSION_LOST,
    SessionState.BACKOFF: events.SESSION_RETRY,
}
_QUIET_STATES: Final = frozenset({SessionState.AUTHENTICATING, SessionState.ENABLING_COD})


class Session:
    """Keeps one account connected, authenticated and COD-protected until ``stop()``.

    A Session runs once: after ``stop()`` a new one is built (a reload does exactly that).

    Read-only attributes (for status endpoints; reading them never touches the network):
        state, connected_since, cod_confirmed_at, reconnects, last_error, test_requests_answered.

    Args:
        cancel_all_first: cancel every open order of the account (``private/cancel_all``) on
            the first set-up that gets that far, after COD is confirmed and before READY: the
            supervisor asks it of an account's first session with ``on_start: cancel_all``.
    """

    def __init__(
        self,
        account: AccountConfig,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
        on_request: OnRequest | None = None,
        cancel_all_first: bool = False,
        pacer: ConnectPacer | None = None,
    ) -> None:
        self.account = account
        self.state = SessionState.STOPPED
        self.connected_since: float | None = None  # wall clock, while a link is open
        self.cod_confirmed_at: float | None = None  # wall clock, while READY
        self.ready_since: float | None = None  # Trio time, since this link first was READY
        self.reconnects = 0
        self.last_error: tuple[str, float] | None = None  # (reason, wall clock)
        self.test_requests_answered = 0
        self.token_refresh_failures = 0  # refused, or failed and ending the link
        self.rpc: RpcConnection | None = None
        self._log = get_logger(account=account.name)
        self._rng = rng if rng is not None else random.Random()
        self._wall_clock = wall_clock
        self._ssl_context = ssl_context
        self._backoff = Backoff(account.backoff.initial, account.backoff.max)
        self._observers: list[Observer] = []
        self._listeners: list[Listener] = []
        self._on_request = on_request
        self._pacer = pacer  # shared by the keeper's sessions: see pacer.py
        self._stop_requested = trio.Event()
        self._shutdown_mode: ShutdownMode = account.on_shutdown
        self.stopped = trio.Event()  # set once run() has returned
        self._scope = trio.CancelScope()
        self._cancel_all_first = cancel_all_first
        self._cod_confirmed_once = False  # a reconnect then reads the account setting first
        self._cod_guard = CodGuard(
            account.cancel_on_disconnect,
            account.cod_check_interval,
            emit=self._emit,
            repair=self._repair_cod,
        )
        self._repairing = False  # a ready link is out of READY while COD is turned on again
        self._upkeep: trio.CancelScope | None = None  # the ready link's refreshes and checks

    def __repr__(self) -> str:
        return f"<Session {self.account.name} {self.state.value}>"

    def watch(self, observer: Observer) -> None:
        """Call ``observer(session, event, fields)`` for every event this session logs.

        State changes (``session.ready``, ``session.retry``, ...) arrive after ``state`` has
        changed. This is how metrics, status and sd_notify learn what happened: from the same
        events the log shows, never by polling.
        """
        self._observers.append(observer)

    def unwatch(self, observer: Observer) -> None:
        """Stop calling ``observer`` (a gateway that stops lets go of the session)."""
        if observer in self._observers:
            self._observers.remove(observer)

    def unlisten(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def listen(self, listener: Listener) -> None:
        """Call ``listener(method, params)`` for every notification but heartbeats, such as the
        ``subscription`` frames a gateway fans out. It runs in the link's reader, so it must be
        quick and never block; its bugs are logged and contained."""
        self._listeners.append(listener)

    async def relay(
        self, method: str, params: Mapping[str, Any], on_answer: OnAnswer | None = None
    ) -> Relayed:
        """Send a request on a client's behalf over the ready link; await ``.answer()`` for
        Deribit's whole answer, or have ``on_answer`` called with it (None if the link ends
        first) from the link's reader, where its bugs are logged and contained.

        Only a READY session relays: its link has COD confirmed with scope ``connection`` on
        itself, whatever scope the account configures, so every order sent through it is
        cancelled by Deribit if the link dies.

        Raises:
            NotReady: the session is not ready; nothing was sent.
            SessionLost: the link ended while sending.
        """
        rpc = self.rpc
        if rpc is None or self.state is not SessionState.READY:
            raise NotReady(self.state.value)
        return await rpc.send_relayed(
            method, params, None if on_answer is None else self._contained(on_answer)
        )

    async def cancel_all(self) -> int:
        """Cancel every open order of the account (``private/cancel_all``) over the ready link,
        and return how many Deribit cancelled: the operator's panic button.

        It goes over this session's link because it is the account's one session: a second
        connection would need the secret elsewhere and break the one-session promise.

        Raises:
            NotReady: the session is not ready; nothing was sent.
            RpcError: Deribit refused it.
            SessionLost: no answer within the request timeout, or the link ended meanwhile.
        """
        rpc = self.rpc
        if rpc is None or self.state is not SessionState.READY:
            raise NotReady(self.state.value)
        return _count_of(await rpc.call("private/cancel_all"))

    def _contained(self, on_answer: OnAnswer) -> OnAnswer:
        """``on_answer`` with its bugs logged: raised in the reader, one would end the link."""

        def hand_over(answer: dict[str, Any] | None) -> None:
            try:
                on_answer(answer)
            except Exception:  # noqa: BLE001 (a gateway's bug must not end the link)
                self._log.exception(events.SESSION_OBSERVER_FAILED, observed="relayed answer")

        return hand_over

    @property
    def stop_requested(self) -> bool:
        """Whether ``stop()`` was called: the session is ending and will not reconnect."""
        return self._stop_requested.is_set()

    @property
    def ready(self) -> bool:
        """True only while COD is confirmed on a live link that is not being ended.

        The state alone lags a dying link by the few steps it takes to notice and tear it down;
        ``rpc`` is cleared the moment the link's work is cancelled, so both are checked.
        """
        return self.state is SessionState.READY and self.rpc is not None

    def snapshot(self) -> dict[str, Any]:
        """What a status endpoint shows about this session, read without touching the network."""
        rpc = self.rpc
        silent = None if rpc is None else round(trio.current_time() - rpc.last_inbound, 3)
        return {
            "state": self.state.value,
            "ready": self.ready,
            "cod_scope": self.account.cancel_on_disconnect,
            "cod_confirmed_at": _iso(self.cod_confirmed_at),
            "connected_since": _iso(self.connected_since),
            "seconds_since_last_message": silent,
            "reconnects": self.reconnects,
            "last_error": None
            if self.last_error is None
            else {"reason": self.last_error[0], "at": _iso(self.last_error[1])},
        }

    def stop(self, on_shutdown: ShutdownMode | None = None) -> None:
        """Ask the session to end per ``on_shutdown`` (the account's unless given); ``run()``
        returns once it has.

        A READY link ends politely (logout first if so), and so does one whose COD is being
        turned on again after a drift: it was ready a moment ago and may carry orders. Anything
        else has no link worth keeping, so it is cancelled at once.
        """
        if on_shutdown is not None:
            self._shutdown_mode = on_shutdown
        self._stop_requested.set()
        if self.state is not SessionState.READY and not self._repairing:
            self._scope.cancel()
        elif self._upkeep is not None:
            self._upkeep.cancel()  # a refresh or a COD repair must not race the logout

    async def run(self) -> None:
        """Connect, stay ready, and reconnect after every loss, until ``stop()`` or cancellation."""
        try:
            with self._scope:
                while not self._stop_requested.is_set():
                    if self._pacer is not None and self.reconnects:
                        await self._pacer.wait_turn()  # a retry: a mass loss must be no storm
                    try:
                        await self._connect_and_serve()
                    except SessionLost as lost:
                        await self._back_off(lost)
                    except Exception as bug:  # noqa: BLE001 (an account must not take the others down)
                        self._log.exception(events.SESSION_UNEXPECTED_ERROR)
                        await self._back_off(SessionLost("internal_error", type(bug).__name__))
        finally:
            self._enter(SessionState.STOPPED)
            self.stopped.set()

    def _enter(self, state: SessionState, level: int = logging.INFO, /, **fields: Any) -> None:
        """The one place where the state changes: set it, then emit its event."""
        self.state = state
        self._emit(logging.DEBUG if state in _QUIET_STATES else level, _EVENT_OF[state], **fields)

    def _emit(self, level: int, event: str, /, **fields: Any) -> None:
        """Log one event and tell the observers.

        An observer's bug is logged and contained: it runs inside this account's error handling,
        where an escaping exception would take every other account down with it.
        """
        if enabled(level):
            self._log.log(level, event, **fields)
        for observer in self._observers:
            try:
                observer(self, event, fields)
            except Exception:  # noqa: BLE001 (metrics or status must never end a session)
                self._log.exception(events.SESSION_OBSERVER_FAILED, observed=event)

    async def _connect_and_serve(self) -> None:
        self._enter(SessionState.CONNECTING, url=self.account.url)
        started = trio.current_time()
        async with open_rpc_connection(
            self.account.url,
            request_timeout=self.account.request_timeout,
            on_notification=self._on_notification,
            ssl_context=self._ssl_context,
            on_request=self._request_timed,
        ) as rpc:
            self.rpc = rpc
            self.connected_since = self._wall_clock()
            try:
                token = await self._set_up(rpc, started)
                await self._serve(rpc, token)
            finally:
                self.rpc = None
                self.connected_since = self.cod_confirmed_at = None

    async def _set_up(self, rpc: RpcConnection, started: float) -> auth.Token:
        account = self.account
        self._enter(SessionState.AUTHENTICATING)
        await rpc.call("public/hello", {"client_name": CLIENT_NAME, "client_version": __version__})
        token = await auth.authenticate(rpc, account, wall_clock=self._wall_clock)
        self._enter(SessionState.ENABLING_COD, scope=account.cancel_on_disconnect)
        if self._cod_confirmed_once:
            await self._cod_guard.before_reenabling(rpc)
        await enable_cod(rpc, account.cancel_on_disconnect)
        self._cod_confirmed_once = True
        self.cod_confirmed_at = self._wall_clock()
        if self._cancel_all_first:
            await self._cancel_left_orders(rpc)
        await rpc.call("public/set_heartbeat", {"interval": _number(account.heartbeat_interval)})
        self.ready_since = trio.current_time()
        self._enter(
            SessionState.READY,
            cod_scope=account.cancel_on_disconnect,
            heartbeat_interval=account.heartbeat_interval,
            setup_ms=round((self.ready_since - started) * 1000, 1),
        )
        return token

    async def _cancel_left_orders(self, rpc: RpcConnection) -> None:
        """``on_start: cancel_all``: cancel what an earlier run left on the book, once per
        Session. A failure fails the set-up like any other step, so it is tried again (after a
        backoff, on a fresh link) before the account is ever ready."""
        cancelled = _count_of(await rpc.call("private/cancel_all"))
        self._cancel_all_first = False
        self._emit(logging.INFO, events.SESSION_START_CANCEL_ALL, cancelled=cancelled)

    async def _serve(self, rpc: RpcConnection, token: auth.Token) -> None:
        """Stay READY until ``stop()``; raise ``DeadLink`` if Deribit falls silent."""
        self._upkeep = upkeep = trio.CancelScope()
        if self._stop_requested.is_set():
            upkeep.cancel()
        try:
            with upkeep:
                await self._keep_up(rpc, token)
        finally:
            self._upkeep = None
        self._enter(SessionState.STOPPING, on_shutdown=self._shutdown_mode)
        if self._shutdown_mode == "logout":
            await self._log_out(rpc)

    async def _log_out(self, rpc: RpcConnection) -> None:
        """Send ``private/logout``; Deribit answers by closing the link, and COD does not fire.

        If Deribit answers with an error, or neither answers nor closes in time, the link is
        closed anyway and COD *will* fire: the operator asked to keep the orders, so that is
        logged as an error rather than passed over.
        """
        try:
            closed = await rpc.call_expecting_close(
                "private/logout", {"invalidate_token": True}, timeout=LOGOUT_TIMEOUT_S
            )
        except SessionLost as refused:
            self._emit(logging.ERROR, events.SESSION_LOGOUT_FAILED, detail=refused.detail)
            return
        if not closed:
            detail = f"Deribit did not close the link within {LOGOUT_TIMEOUT_S:g}s"
            self._emit(logging.ERROR, events.SESSION_LOGOUT_FAILED, detail=detail)

    def _request_timed(self, method: str, seconds: float) -> None:
        """Hand a request's duration to ``on_request``, containing its bugs as an observer's."""
        if self._on_request is None:
            return
        try:
            self._on_request(method, seconds)
        except Exception:  # noqa: BLE001 (metrics must never end a session)
            self._log.exception(events.SESSION_OBSERVER_FAILED, observed="request")

    def _on_notification(self, method: str, params: Any) -> Reply | None:
        """Answer a test_request at once (the reader sends the ``public/test``); hand every
        other notification to the listeners."""
        if method != "heartbeat":
            for listener in self._listeners:
                try:
                    listener(method, params)
                except Exception:  # noqa: BLE001 (a gateway's bug must not end the link)
                    self._log.exception(events.SESSION_OBSERVER_FAILED, observed=method)
            return None
        if not isinstance(params, dict) or params.get("type") != "test_request":
            return None
        return Reply("public/test", {}, partial(self._test_request_answered, trio.current_time()))

    def _test_request_answered(self, asked: float, answer: dict[str, Any] | None) -> None:
        """Deribit counts the ``public/test`` itself as the answer, so an error reply still
        proves the link alive: it is logged, and only a rate limit ends the link.

        An answer is counted (metrics read the count at scrape time) and logged only at debug,
        not told to the observers: it changes no state, and at 1,000 accounts it is a hundred
        times a second, where the observers' calls were a tenth of the keeper's idle CPU.
        """
        if answer is None:
            return  # the link ended first
        try:
            result_of("public/test", answer)
        except RpcError as refused:
            if refused.code == ErrorCode.TOO_MANY_REQUESTS:
                raise
            self._emit(logging.WARNING, events.SESSION_TEST_REQUEST_REFUSED, code=refused.code)
            return
        self.test_requests_answered += 1
        if enabled(logging.DEBUG):
            latency_ms = round((trio.current_time() - asked) * 1000, 3)
            self._log.debug(events.SESSION_TEST_REQUEST_ANSWERED, latency_ms=latency_ms)

    async def _keep_up(self, rpc: RpcConnection, token: auth.Token) -> None:
        """Refresh the token when due and check COD every ``cod_check_interval``, until
        cancelled (``stop()``); raise ``DeadLink`` if Deribit falls silent.

        All in this one task, one after the other: a task each would cost memory on every
        session for two sleeps, and the guard relies on a refresh's reading never running
        beside a check. The next check is due one interval after the last one ended; the first
        comes after a random half to whole interval, so that accounts ready together (a start,
        a mass reconnect) do not check COD together every interval for ever: 1,000 checks in
        the same two seconds each minute were the bench's worst test_request answers.

        One silence watchdog at a time: the quiet one (a probe is due) while sleeping, the
        dead-link one while asking; every inbound frame moves one deadline, not two.
        """
        quiet = quiet_limit(self.account.heartbeat_interval)
        silence = silence_limit(self.account.heartbeat_interval)
        first = self._cod_guard.interval * self._rng.uniform(0.5, 1.0)
        next_check = trio.current_time() + first
        while True:
            with rpc.silence_watchdog(quiet) as quieted:
                await trio.sleep_until(min(token.refresh_at, next_check))
            with rpc.silence_watchdog(silence) as dead:
                if quieted.cancelled_caught:
                    await self._probe(rpc)
                if trio.current_time() >= token.refresh_at:
                    token = await self._refresh_token(rpc, token)
                if trio.current_time() >= next_check:
                    await self._cod_guard.check(rpc)
                    next_check = trio.current_time() + self._cod_guard.interval
            if dead.cancelled_caught:
                raise DeadLink(trio.current_time() - rpc.last_inbound)

    async def _probe(self, rpc: RpcConnection) -> None:
        """Ask a quiet link whether it is alive (``public/test``); the silence watchdog
        declares it dead if no answer comes before the silence limit.

        An answer (an error too, but a rate limit) means the link lives but Deribit's
        heartbeats stopped or came late, and without them Deribit would not notice this link
        die: ``public/set_heartbeat`` again, on the same link (a reconnect would fire COD and
        cancel the orders it protects), logged as a warning.
        """
        quiet_s = round(trio.current_time() - rpc.last_inbound, 3)
        try:
            await rpc.call("public/test")
        except RpcError as refused:
            if refused.code == ErrorCode.TOO_MANY_REQUESTS:
                raise
        interval = _number(self.account.heartbeat_interval)
        await rpc.call("public/set_heartbeat", {"interval": interval})
        self._emit(logging.WARNING, events.SESSION_HEARTBEAT_RESTARTED, quiet_s=quiet_s)

    async def _refresh_token(self, rpc: RpcConnection, token: auth.Token) -> auth.Token:
        """Refresh the connection's auth before the token runs out, then re-confirm COD.

        A refused refresh (13009: an expired or revoked refresh token) falls back to a full
        authentication on the same connection: reconnecting instead would fire COD and cancel
        the orders it protects, for nothing. COD found off then is a drift, repaired in place
        as the guard repairs one; any error of the reading ends the link, as before the guard.
        """
        grant = "refresh_token"
        try:
            token = await auth.refresh(rpc, token)
        except RpcError as refused:
            self.token_refresh_failures += 1
            if refused.code != ErrorCode.UNAUTHORIZED:
                raise  # a rate limit or an outage: a fresh auth now would fare no better
            self._emit(logging.WARNING, events.SESSION_TOKEN_REFRESH_REFUSED, code=refused.code)
            try:
                token = await auth.authenticate(rpc, self.account, wall_clock=self._wall_clock)
            except SessionLost:
                self.token_refresh_failures += 1
                raise
            grant = auth.GRANT_OF[self.account.auth]
        except SessionLost:
            self.token_refresh_failures += 1  # no answer, or the link ended meanwhile
            raise
        await self._cod_guard.confirm(rpc, during="token_refresh")
        self.cod_confirmed_at = self._wall_clock()
        self._emit(
            logging.INFO,
            events.SESSION_TOKEN_REFRESHED,
            grant=grant,
            expires_in=token.expires_in,
        )
        return token

    async def _repair_cod(self, rpc: RpcConnection, drift: Drift) -> None:
        """Leave READY, turn COD on again and have it confirmed, then enter READY again.

        Meanwhile the session is not ready: nothing new is relayed (a gateway answers 13028),
        /readyz says 503, and what is already in flight goes on. The guard calls it holding
        its lock, so a token refresh's reading cannot see the repair half done.

        Raises:
            CodNotConfirmed, RpcError, SessionLost: the repair failed; the link is lost, as
                when COD cannot be confirmed at connect.
        """
        scope = self.account.cancel_on_disconnect
        self.cod_confirmed_at = None
        self._repairing = True
        try:
            self._enter(SessionState.ENABLING_COD, scope=scope, repairing=drift.scope)
            started = trio.current_time()
            await enable_cod(rpc, scope)
        finally:
            self._repairing = False
        self.cod_confirmed_at = self._wall_clock()
        if self._stop_requested.is_set():
            return  # stop() came meanwhile: the link is ending, not ready again
        self._enter(
            SessionState.READY,
            cod_scope=scope,
            heartbeat_interval=self.account.heartbeat_interval,
            repaired=drift.scope,
            repair_ms=round((trio.current_time() - started) * 1000, 1),
        )

    async def _back_off(self, lost: SessionLost) -> None:
        """Log the loss, wait a jittered delay, and let ``run()`` try again."""
        now = trio.current_time()
        lost_in = self.state
        uptime = 0.0 if self.ready_since is None else now - self.ready_since
        self.ready_since = None
        if uptime >= STABLE_AFTER_S:
            self._backoff = self._backoff.reset()
        severity = classify(lost)
        level = logging.ERROR if severity is Severity.PERSISTENT else logging.WARNING
        self.last_error = (lost.reason, self._wall_clock())
        self._enter(
            SessionState.LOST,
            level,
            reason=lost.reason,
            detail=lost.detail,
            state=lost_in.value,
            uptime_s=round(uptime, 3),
            severity=severity.value,
            **({"code": lost.code} if hasattr(lost, "code") else {}),
        )
        if self._stop_requested.is_set():
            return  # lost while stopping: nothing to retry
        delay = self._backoff.delay(self._rng, severity)
        self._backoff = self._backoff.next()
        self.reconnects += 1
        self._enter(
            SessionState.BACKOFF, level, delay_s=round(delay, 3), attempt=self._backoff.attempt
        )
        await trio.sleep(delay)
