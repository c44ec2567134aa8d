"""The Keeper: one nursery holding a Session per account, the process's signals, and reloads.

Accounts are isolated: a Session absorbs its own failures (it logs, backs off and reconnects), so
nothing one account meets can cancel another. The Keeper does only what concerns all of them:

* shutdown: every session ends per its ``on_shutdown``, under one deadline, so the process exits
  within ``SHUTDOWN_DEADLINE_S`` even if Deribit never answers;
* reload (SIGHUP): a new config is compared with the running one by account name; only the
  accounts that were added, removed or changed are touched, so an unchanged account keeps its
  connection (no reconnect, no new auth, no COD firing).
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
from typing import Any, Final

import trio

from . import __version__, events, logs
from .config import AccountConfig, HttpConfig, KeeperConfig, load_config
from .errors import ConfigError
from .http import create_app, serve_http
from .logs import get_logger
from .metrics import KeeperMetrics
from .session import Session, SessionState
from .shard import Shard, select
from .systemd import Notifier, keep_watchdog_fed, status_line, watchdog_interval

# systemd's and Kubernetes' patience is usually longer; 5 s is the promise made in the README.
# Half a second is kept back for closing sockets and the last log lines.
SHUTDOWN_DEADLINE_S: Final = 4.5
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL: Final = signal.SIGHUP
# The events after which systemd's STATUS line may read differently.
_STATE_EVENTS: Final = frozenset(
    {
        events.SESSION_CONNECTING,
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
    ) -> None:
        self.shard = shard
        self.config = self._narrow(config)
        self.sessions: dict[str, Session] = {}
        self.metrics = KeeperMetrics()
        self.http_port: int | None = None  # the bound port, once the endpoint listens
        self._environ = os.environ if environ is None else environ
        self._notifier: Notifier | None = None
        self._status_changed, self._status_wanted = trio.open_memory_channel[None](1)
        self._rng = rng if rng is not None else random.Random()
        self._wall_clock = wall_clock
        self._ssl_context = ssl_context
        self._log = get_logger()
        self._sessions_nursery: trio.Nursery | None = None
        self._stop_requested = trio.Event()
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
            if self.config.http is not None:
                await self._start_http(outer, self.config.http)
            self._log.info(
                events.KEEPER_STARTED,
                version=__version__,
                accounts=len(self.config.accounts),
                shard=None if self.shard is None else str(self.shard),
            )
            self._log_warnings(self.config)
            async with trio.open_nursery() as sessions:
                self._sessions_nursery = sessions
                self._running = True
                # Keeps the nursery open while a reload or a shard leaves it with no account.
                sessions.start_soon(self._stop_requested.wait)
                for account in self.config.accounts:
                    self._launch(account)
                if self._stopping:  # stop() came before run()
                    self._begin_shutdown()
                task_status.started()
                if self._notifier is not None:
                    # Ready for systemd means "running": Deribit's state is /readyz's business,
                    # and an exchange outage must not make systemd restart the keeper.
                    await self._notifier.ready()
            self._running = False
            outer.cancel_scope.cancel()  # every session is done: stop the helpers
        self._log.info(events.KEEPER_STOPPED)

    def stop(self, reason: str = "requested") -> None:
        """Begin a graceful stop; called again, end every session at once.

        Safe before ``run()``: the sessions then end as soon as they are launched.
        """
        if self._stopping:
            if self._sessions_nursery is not None:
                self._sessions_nursery.cancel_scope.cancel()
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
        )
        self.config = config
        if config.log != logs.current():
            logs.configure(config.log)
        for name in result.removed:
            self.sessions[name].stop()
        for name in result.changed:
            self._relaunch_after(self.sessions[name], new[name])
        for name in result.added:
            self._launch(new[name])
        return result

    def reload_from_disk(self) -> ReloadResult | None:
        """Re-read the config file; on any problem log it and keep running exactly as before."""
        try:
            config = load_config(self.config.source)
        except ConfigError as error:
            self._log.error(events.KEEPER_RELOAD_FAILED, reason=str(error))
            return None
        needs_restart = ["http.listen"] if config.http != self.config.http else []
        result = self.reload(config)
        self._log.info(
            events.KEEPER_RELOADED,
            added=list(result.added),
            removed=list(result.removed),
            changed=list(result.changed),
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
            await notifier.stopping()

        nursery.start_soon(say_stopping)

    async def _report_status(self, notifier: Notifier) -> None:
        """Send systemd a STATUS line after state changes, coalescing bursts into one."""
        last = None
        async for _ in self._status_wanted:
            line = status_line(self.sessions)
            if line != last:
                await notifier.status(line)
                last = line

    def _state_changed(self, _session: Session, event: str, _fields: Mapping[str, Any]) -> None:
        if event in _STATE_EVENTS:
            try:
                self._status_changed.send_nowait(None)
            except trio.WouldBlock:
                pass  # a report is already due; it will read the latest states

    async def _start_http(self, nursery: trio.Nursery, http: HttpConfig) -> None:
        try:
            self.http_port = await nursery.start(serve_http, create_app(self), http.host, http.port)
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
            rng=random.Random(self._rng.random()),
            wall_clock=self._wall_clock,
            ssl_context=self._ssl_context,
            on_request=self.metrics.on_request,
        )
        self.metrics.track(session)
        session.watch(self._state_changed)
        self.sessions[account.name] = session
        self._state_changed(session, events.SESSION_STOPPED, {})
        self._sessions_nursery.start_soon(
            self._run_session, session, name=f"session:{account.name}"
        )

    async def _run_session(self, session: Session) -> None:
        try:
            await session.run()
        finally:
            name = session.account.name
            removed = all(a.name != name for a in self.config.accounts)
            if removed and self.sessions.get(name) is session:
                del self.sessions[name]
                self.metrics.forget(name)
                self._state_changed(session, events.SESSION_STOPPED, {})

    def _relaunch_after(self, old: Session, account: AccountConfig) -> None:
        """Stop ``old``; once it has ended, start a session with the changed settings.

        Until then ``old`` stays in ``sessions``, so status shows the account as stopped rather
        than not at all.
        """
        assert self._sessions_nursery is not None

        async def relaunch() -> None:
            await old.stopped.wait()
            if not self._stopping:
                self._launch(account)

        old.stop()
        self._sessions_nursery.start_soon(relaunch, name=f"relaunch:{account.name}")

    def _begin_shutdown(self) -> None:
        assert self._sessions_nursery is not None
        self._stop_requested.set()
        for session in self.sessions.values():
            session.stop()
        self._sessions_nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_DEADLINE_S

    async def _handle_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS, RELOAD_SIGNAL) as received:
            task_status.started()
            async for signum in received:
                if signum == RELOAD_SIGNAL:
                    if not self._stopping:
                        await self._reload_with_systemd()
                else:
                    self.stop(reason=signal.Signals(signum).name)
