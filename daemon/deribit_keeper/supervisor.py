"""The Keeper: one nursery holding a Session per account, the process's signals, and reloads.

Accounts are isolated: a Session absorbs its own failures (it logs, backs off and reconnects), so
nothing one account meets can cancel another. The Keeper does only what concerns all of them:

* shutdown: every session ends per its ``on_shutdown``, under one deadline, so the process exits
  within ``SHUTDOWN_DEADLINE_S`` even if Deribit never answers;
* reload (SIGHUP): a new config is compared with the running one by account name; only the
  accounts that were added, removed or changed are touched, so an unchanged account keeps its
  connection (no reconnect, no new auth, no COD firing). Gateways are compared apart from the
  rest of an account: a changed ``gateway`` block restarts the gateway (its local links closed
  with 1012) and keeps the upstream session.
* gateways: an account with a ``gateway`` block gets a ``Gateway`` that relays through whichever
  Session the account has now; gateways live in their own nursery, beside the sessions, so a
  session restarted by a reload finds its gateway still listening.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import trio

from . import __version__, events, logs
from .config import AccountConfig, GatewayConfig, HttpConfig, KeeperConfig, load_config
from .errors import ConfigError
from .gateway import Gateway
from .heap import HeapFreezer
from .http import create_app, serve_http
from .logs import get_logger
from .metrics import KeeperMetrics
from .pacer import ConnectPacer
from .session import Session, SessionState
from .shard import Shard, select
from .systemd import Notifier, keep_watchdog_fed, status_line, watchdog_interval

# systemd's and Kubernetes' patience is usually longer; 5 s is the promise made in the README.
# Half a second is kept back for closing sockets and the last log lines.
SHUTDOWN_DEADLINE_S: Final = 4.5
GATEWAY_RESTART_S: Final = 1.0  # a gateway that crashed on a bug starts again after this
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL: Final = signal.SIGHUP
# The events after which systemd's STATUS line may read differently.
_STATE_EVENTS: Final = frozenset(
    {
        events.SESSION_CONNECTING,
        events.SESSION_ENABLING_COD,  # also how a ready account leaves READY for a COD repair
        events.SESSION_READY,
        events.SESSION_LOST,
        events.SESSION_RETRY,
        events.SESSION_STOPPING,
        events.SESSION_STOPPED,
    }
)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """Which accounts a reload touched, by name."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    gateways: tuple[str, ...] = ()  # accounts whose gateway block was added, changed or removed


class Keeper:
    """Runs every configured account's Session until ``stop()`` or SIGTERM/SIGINT."""

    def __init__(
        self,
        config: KeeperConfig,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
        shard: Shard | None = None,
        environ: Mapping[str, str] | None = None,
        freeze_heap: bool = False,  # heap.py says why; `deribit-keeper run` turns it on
    ) -> None:
        self.shard = shard
        self.config = self._narrow(config)
        self.sessions: dict[str, Session] = {}
        self.gateways: dict[str, Gateway] = {}
        self.metrics = KeeperMetrics()
        self.http_port: int | None = None  # the bound port, once the endpoint listens
        self._environ = os.environ if environ is None else environ
        self._notifier: Notifier | None = None
        self._said_stopping = False
        self._status_changed, self._status_wanted = trio.open_memory_channel[None](1)
        self._rng = rng if rng is not None else random.Random()
        self._heap = HeapFreezer(enabled=freeze_heap)
        # The sessions ready as of their latest event: 'every account ready' in one comparison,
        # not a scan of all sessions at each of a thousand readies (half a million checks).
        self._ready: set[Session] = set()
        self._pacer = ConnectPacer()  # one for all: a mass disconnect must not become a storm
        self._wall_clock = wall_clock
        self._ssl_context = ssl_context
        self._log = get_logger()
        self._sessions_nursery: trio.Nursery | None = None
        self._gateways_nursery: trio.Nursery | None = None
        self._stop_requested = trio.Event()
        self._launched = trio.Event()  # a SIGHUP before this waits: there is nothing to reload
        self._relaunching: set[str] = set()
        self._regating: set[str] = set()  # accounts whose new gateway waits for the old to end
        # Accounts that have been ready in this process: `on_start: cancel_all` is for what an
        # earlier process left, so only an account's first session to get ready does it.
        self._started: set[str] = set()
        self._stopping = False
        self._running = False

    def __repr__(self) -> str:
        ready = sum(s.state is SessionState.READY for s in self.sessions.values())
        return f"<Keeper {ready}/{len(self.sessions)} ready>"

    def alive(self) -> bool:
        """Whether the supervisor loop is running and not shutting down (for /healthz)."""
        return self._running and not self._stopping

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until ``stop()``. ``task_status.started()`` once every session is launched.

        With ``handle_signals``: the first SIGTERM or SIGINT starts a graceful stop, a second one
        ends the sessions at once, and SIGHUP reloads the config file.
        """
        async with trio.open_nursery() as outer:
            if handle_signals:
                await outer.start(self._handle_signals)
            await self._start_systemd(outer)
            if self._heap.enabled:
                outer.start_soon(self._heap.run)
            if self.config.http is not None:
                await self._start_http(outer, self.config.http)
            self._log.info(
                events.KEEPER_STARTED,
                version=__version__,
                accounts=len(self.config.accounts),
                shard=None if self.shard is None else str(self.shard),
            )
            self._log_warnings(self.config)
            async with trio.open_nursery() as gateways, trio.open_nursery() as sessions:
                self._gateways_nursery, self._sessions_nursery = gateways, sessions
                self._running = True
                # Keep the nurseries open while a reload or a shard leaves them with nothing.
                gateways.start_soon(self._stop_requested.wait)
                sessions.start_soon(self._stop_requested.wait)
                for account in self.config.accounts:
                    self._start_gateway(account)  # first: an engine may connect at once
                    self._launch(account)
                self._launched.set()
                if self._stopping:  # stop() came before run()
                    self._begin_shutdown()
                task_status.started()
                if self._notifier is not None and not self._stopping:
                    # Ready for systemd means "running": Deribit's state is /readyz's business,
                    # and an exchange outage must not make systemd restart the keeper.
                    await self._notifier.ready()
            self._running = False
            if self._notifier is not None and not self._said_stopping:
                await self._notifier.stopping()  # the sessions ended before say_stopping could
            outer.cancel_scope.cancel()  # every session is done: stop the helpers
        self._log.info(events.KEEPER_STOPPED)

    def stop(self, reason: str = "requested") -> None:
        """Begin a graceful stop; called again, end every session at once.

        Safe before ``run()``: the sessions then end as soon as they are launched.
        """
        if self._stopping:
            for nursery in (self._sessions_nursery, self._gateways_nursery):
                if nursery is not None:
                    nursery.cancel_scope.cancel()
            return
        self._stopping = True
        self._log.info(events.KEEPER_STOPPING, reason=reason, deadline_s=SHUTDOWN_DEADLINE_S)
        if self._sessions_nursery is not None:
            self._begin_shutdown()

    def reload(self, config: KeeperConfig) -> ReloadResult:
        """Move to ``config``: stop removed accounts, start added ones, restart changed ones.

        An account whose settings (secret included) are unchanged keeps its Session and its
        connection. A changed account's new session starts only once the old one has ended, so
        the two never hold connections for the same key at once.
        """
        self._log_warnings(config)
        config = self._narrow(config)
        old = {a.name: a for a in self.config.accounts}
        new = {a.name: a for a in config.accounts}
        result = ReloadResult(
            added=tuple(sorted(new.keys() - old.keys())),
            removed=tuple(sorted(old.keys() - new.keys())),
            changed=tuple(sorted(n for n in old.keys() & new.keys() if old[n] != new[n])),
            gateways=tuple(
                sorted(
                    n
                    for n in old.keys() | new.keys()
                    if _gateway_of(old.get(n)) != _gateway_of(new.get(n))
                )
            ),
        )
        self.config = config
        if config.log != logs.current():
            logs.configure(config.log)
        if self._sessions_nursery is not None and not self._stopping:
            self._converge()
        return result

    def _converge(self) -> None:
        """Make the running sessions match ``self.config``, whatever earlier reloads left.

        The comparison is with the sessions as they run, not with the previous config: a
        session still ending from an earlier reload (removed, or replaced) counts as not wanted
        as it is. At most one relaunch waits per account, and it starts whatever the config
        wants *when* the old session has ended, so however quickly reloads follow each other,
        an account never has two links, and a removed one never comes back.
        """
        wanted = self._wanted()
        for name, session in list(self.sessions.items()):
            account = wanted.get(name)
            if account is None:
                session.stop()
            elif session.account != account or session.stop_requested:
                self._relaunch_after(session)
        for name, account in wanted.items():
            if name not in self.sessions:
                self._launch(account)
        self._converge_gateways(wanted)

    def _converge_gateways(self, wanted: Mapping[str, AccountConfig]) -> None:
        """The same for gateways: stop removed ones, restart changed ones, start added ones."""
        for name, gateway in list(self.gateways.items()):
            config = _gateway_of(wanted.get(name))
            if config is None:
                gateway.stop(1001, "gateway removed by reload")
            elif config != gateway.config or gateway.stopping:
                self._restart_gateway_after(gateway)
        for account in wanted.values():
            if account.gateway is not None and account.name not in self.gateways:
                self._start_gateway(account)

    def reload_from_disk(self) -> ReloadResult | None:
        """Re-read the config file; on any problem log it and keep running exactly as before."""
        try:
            config = load_config(self.config.source)
        except ConfigError as error:
            self._log.error(events.KEEPER_RELOAD_FAILED, reason=str(error))
            return None
        needs_restart = ["http.listen"] if _listen_of(config) != _listen_of(self.config) else []
        result = self.reload(config)
        self._log.info(
            events.KEEPER_RELOADED,
            added=list(result.added),
            removed=list(result.removed),
            changed=list(result.changed),
            gateways_restarted=list(result.gateways),
            needs_restart=needs_restart,
        )
        return result

    async def _start_systemd(self, nursery: trio.Nursery) -> None:
        """Talk to systemd when it started us with NOTIFY_SOCKET: watchdog, status, stopping."""
        self._notifier = notifier = Notifier.from_environ(self._environ)
        if notifier is None:
            return
        interval = watchdog_interval(self._environ)
        if interval is not None:
            nursery.start_soon(keep_watchdog_fed, notifier, interval)
        nursery.start_soon(self._report_status, notifier)

        async def say_stopping() -> None:
            await self._stop_requested.wait()
            self._said_stopping = await notifier.stopping()

        nursery.start_soon(say_stopping)

    async def _report_status(self, notifier: Notifier) -> None:
        """Send systemd a STATUS line after state changes, coalescing bursts into one."""
        last = None
        async for _ in self._status_wanted:
            line = status_line(self.sessions)
            if line != last:
                await notifier.status(line)
                last = line

    def _state_changed(self, session: Session, event: str, _fields: Mapping[str, Any]) -> None:
        if session.ready:
            self._ready.add(session)
        else:
            self._ready.discard(session)  # a removed or replaced one ends with session.stopped
        all_ready = event == events.SESSION_READY and len(self._ready) == len(self.sessions)
        self._heap.session_changed(event, all_ready=all_ready)
        if event in _STATE_EVENTS:
            try:
                self._status_changed.send_nowait(None)
            except trio.WouldBlock:
                pass  # a report is already due; it will read the latest states

    async def _start_http(self, nursery: trio.Nursery, http: HttpConfig) -> None:
        try:
            app = create_app(self, wall_clock=self._wall_clock)
            self.http_port = await nursery.start(serve_http, app, http.host, http.port)
        except OSError as error:
            self._log.error(events.KEEPER_HTTP_FAILED, listen=http.bind, error=str(error))
            raise

    def _narrow(self, config: KeeperConfig) -> KeeperConfig:
        """The part of ``config`` this keeper's shard holds (all of it without a shard)."""
        if self.shard is None:
            return config
        return dataclasses.replace(config, accounts=select(config.accounts, self.shard))

    def _log_warnings(self, config: KeeperConfig) -> None:
        for warning in config.warnings:
            self._log.warning(warning.event, key_path=warning.key_path, detail=warning.detail)

    async def _reload_with_systemd(self) -> None:
        """RELOADING=1, reload, then READY=1 whatever happened (else systemd waits it out)."""
        if self._notifier is not None:
            await self._notifier.reloading()
        self.reload_from_disk()
        if self._notifier is not None:
            await self._notifier.ready()

    def _launch(self, account: AccountConfig) -> None:
        assert self._sessions_nursery is not None
        session = Session(
            account,
            rng=self._rng,  # one generator for all: a Random each was 2.5 KiB per session
            wall_clock=self._wall_clock,
            ssl_context=self._ssl_context,
            on_request=self.metrics.on_request,
            cancel_all_first=account.on_start == "cancel_all" and account.name not in self._started,
            pacer=self._pacer,
        )
        self.metrics.track(session)
        session.watch(self._state_changed)
        session.watch(self._note_started)
        self.sessions[account.name] = session
        gateway = self.gateways.get(account.name)
        if gateway is not None:
            gateway.attach(session)
        self._state_changed(session, events.SESSION_STOPPED, {})
        self._sessions_nursery.start_soon(
            self._run_session, session, name=f"session:{account.name}"
        )

    def _note_started(self, session: Session, event: str, _fields: Mapping[str, Any]) -> None:
        """Remember that the account got ready once (its start cancel, if any, is done)."""
        if event == events.SESSION_READY:
            self._started.add(session.account.name)

    async def _run_session(self, session: Session) -> None:
        try:
            await session.run()
        finally:
            name = session.account.name
            if name not in self._wanted() and self.sessions.get(name) is session:
                del self.sessions[name]
                self.metrics.forget(name)
                self._state_changed(session, events.SESSION_STOPPED, {})

    def _relaunch_after(self, old: Session) -> None:
        """Stop ``old``; once it has ended, start what the config then wants for its account.

        Until then ``old`` stays in ``sessions``, so status shows the account as stopping rather
        than not at all.
        """
        assert self._sessions_nursery is not None
        name = old.account.name
        # The engine goes on trading through the new session, and its orders on the old link
        # would belong to a connection that is gone: no COD on either hop would ever cancel
        # them. So a session that relays ends as a lost link does, and Deribit's COD cancels
        # what went through it; `on_shutdown: logout` is for stopping the keeper.
        old.stop("close" if name in self.gateways else None)
        if name in self._relaunching:
            return  # the waiting relaunch will read the newest config when it wakes

        async def relaunch() -> None:
            try:
                await old.stopped.wait()
            finally:
                self._relaunching.discard(name)
            account = self._wanted().get(name)
            if account is not None and not self._stopping and self.sessions.get(name) is old:
                self._launch(account)

        self._relaunching.add(name)
        self._sessions_nursery.start_soon(relaunch, name=f"relaunch:{name}")

    def _start_gateway(self, account: AccountConfig) -> None:
        """Start the account's gateway, if it has one, relaying through its current session."""
        if account.gateway is None:
            return
        assert self._gateways_nursery is not None
        gateway = Gateway(
            account,
            account.gateway,
            wall_clock=self._wall_clock,
            on_relayed=partial(self.metrics.on_relayed, account.name),
        )
        self.metrics.track_gateway(gateway)
        self.gateways[account.name] = gateway
        session = self.sessions.get(account.name)
        if session is not None and not session.stop_requested:
            gateway.attach(session)
        self._gateways_nursery.start_soon(
            self._run_gateway, gateway, name=f"gateway:{account.name}"
        )

    async def _run_gateway(self, gateway: Gateway) -> None:
        """Run ``gateway``; a bug that escapes it is logged, and a new one starts a second
        later, as a session retries: one account's gateway never takes the keeper down."""
        crashed = False
        try:
            await gateway.run()
        except Exception:  # noqa: BLE001 (contained per account, like a session's bug)
            self._log.exception(events.GATEWAY_UNEXPECTED_ERROR, account=gateway.account)
            crashed = True
        finally:
            if self.gateways.get(gateway.account) is gateway:
                del self.gateways[gateway.account]
                self.metrics.forget_gateway(gateway.account)
        if crashed:
            await trio.sleep(GATEWAY_RESTART_S)
            account = self._wanted().get(gateway.account)
            if account is not None and not self._stopping and account.name not in self.gateways:
                self._start_gateway(account)

    def _restart_gateway_after(self, old: Gateway) -> None:
        """Stop ``old`` (links closed with 1012); once its port is free, start what the config
        then wants. The upstream session is not touched."""
        assert self._gateways_nursery is not None
        name = old.account
        old.stop(1012, "gateway restarted by reload")
        if name in self._regating:
            return

        async def restart() -> None:
            try:
                await old.stopped.wait()
            finally:
                self._regating.discard(name)
            account = self._wanted().get(name)
            if account is not None and not self._stopping and name not in self.gateways:
                self._start_gateway(account)

        self._regating.add(name)
        self._gateways_nursery.start_soon(restart, name=f"regate:{name}")

    def _wanted(self) -> dict[str, AccountConfig]:
        return {a.name: a for a in self.config.accounts}

    def _begin_shutdown(self) -> None:
        assert self._sessions_nursery is not None and self._gateways_nursery is not None
        self._stop_requested.set()
        # Local links first (1001, local COD does not fire), then the upstream links per
        # on_shutdown: what the engine sent follows the upstream hop (COD, or kept by logout).
        for gateway in self.gateways.values():
            gateway.stop()
        for session in self.sessions.values():
            session.stop()
        deadline = trio.current_time() + SHUTDOWN_DEADLINE_S
        self._sessions_nursery.cancel_scope.deadline = deadline
        self._gateways_nursery.cancel_scope.deadline = deadline

    async def _handle_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS, RELOAD_SIGNAL) as received:
            task_status.started()
            async for signum in received:
                if signum == RELOAD_SIGNAL:
                    await self._launched.wait()  # a SIGHUP during start-up applies after it
                    if not self._stopping:
                        await self._reload_with_systemd()
                else:
                    self.stop(reason=signal.Signals(signum).name)


def _gateway_of(account: AccountConfig | None) -> GatewayConfig | None:
    return None if account is None else account.gateway


def _listen_of(config: KeeperConfig) -> str | None:
    """Where the endpoint listens: what a reload cannot change without a restart (a new admin
    token, read on every request, takes effect at once)."""
    return None if config.http is None else config.http.bind
