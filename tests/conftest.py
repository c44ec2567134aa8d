"""Shared fixtures, and the policy every test here follows.

* Real sockets on loopback only, always port 0: the simulator runs in the test's own Trio loop.
* Anything involving time runs on trio's ``autojump_clock``: hours of heartbeats take
  milliseconds and no test really sleeps. (A few CLI tests run a real process in real time; they
  wait on its output, never on a fixed delay.)
* Logs go through the real processor chain (``logs.configure``) into a buffer that tests read as
  JSON events, so redaction is exercised by every test that logs.
* No secret and no token reaches any output: after every test, everything it made the keeper
  show (log lines, reprs, snapshots, /status and /metrics, every gateway answer, error texts,
  sd_notify lines; see ``Exposure``) is searched for every secret and every issued token, and
  what reached the simulators for every local secret and token. The failure names the test.
* structlog is reset after every test.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import hypercorn.trio
import pytest
import structlog
import trio

from deribit_keeper import logs
from deribit_keeper.config import (
    AccountConfig,
    BackoffConfig,
    KeeperConfig,
    LocalClient,
    LogConfig,
    Secret,
)
from deribit_keeper.gateway import local_auth
from deribit_keeper.simulator import SimAccount, Simulator

# Secrets chosen to be easy to grep for in any output.
SIM_ACCOUNTS = (
    SimAccount(name="main", client_id="main-id", client_secret="main-SECRET-do-not-log"),
    SimAccount(name="hedge", client_id="hedge-id", client_secret="hedge-SECRET-do-not-log"),
    SimAccount(name="third", client_id="third-id", client_secret="third-SECRET-do-not-log"),
)
# The gateway's own local credentials, as an engine would hold them: never Deribit's.
ENGINE = LocalClient("engine", Secret("engine-SECRET-do-not-log"))
RESEARCH = LocalClient("research", Secret("research-SECRET-do-not-log"))
SECRETS = (
    *(a.client_secret for a in SIM_ACCOUNTS),
    *(c.client_secret.reveal() for c in (ENGINE, RESEARCH)),
)


class LogLines:
    """What the keeper logged, as parsed JSON events."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in self.text.splitlines() if line.strip()]
        return [
            e
            for e in found
            if (name is None or e["event"] == name)
            and all(e.get(k) == v for k, v in fields.items())
        ]

    def names(self, **fields: Any) -> list[str]:
        return [e["event"] for e in self.events(**fields)]


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def log_lines() -> LogLines:
    """Capture every test's log lines (JSON, debug level) through the keeper's processor chain."""
    lines = LogLines()
    logs.configure(LogConfig(level="debug", format="json"), stream=lines.stream)
    return lines


T = TypeVar("T")


class Exposure:
    """Everything the current test's keeper showed anyone, and what it must never show.

    Filled as the test runs, by wrappers that cost one list append each (see ``_watched``):

    * ``built``: every Keeper, Session, Gateway and Simulator made; after the test their reprs,
      configs, snapshots (what /status serves), link reprs and metrics page are rendered.
    * ``served``: every ASGI message the keeper's own servers sent, through serving.py's
      ``serve`` (hypercorn's), which serves both the operations endpoint and every gateway: /status,
      /metrics and cancel-all bodies, gateway WebSocket frames, HTTP answers and close reasons,
      headers included. Taken at the server, so it covers every client (ccxt too).
    * ``errors``: every KeeperError and RpcFault made, as str and repr.
    * ``notified``: every sd_notify datagram's fields.
    * ``shown``: what a test itself adds (CLI output of a real process, say) with ``show``.

    Secrets are the simulators' accounts', the local clients' and the admin tokens of the
    keepers built, plus ``secrets.add`` by a test. Tokens are every one a simulator or a gateway
    issued. Nothing rendered may hold either; ``served`` may hold a local token only where the
    gateway hands it out (a ``public/auth`` result). What the simulators *received* may hold
    Deribit's own secrets and tokens, but no local secret, local token or admin token: those
    must stop at the keeper.
    """

    def __init__(self, log_lines: LogLines) -> None:
        self.log_lines = log_lines
        self.secrets: set[str] = set(SECRETS)
        self.deribit_secrets: set[str] = set()  # the simulators' accounts': Deribit holds them
        self.built: list[object] = []
        self.local_tokens: list[str] = []
        self.served: list[str] = []
        self.errors: list[BaseException] = []
        self.notified: list[str] = []
        self.shown: list[str] = []

    def show(self, text: str) -> None:
        """Something the test showed a user itself, to be searched like the rest."""
        self.shown.append(text)

    def problems(self) -> list[str]:
        """One line per output that holds something it must not; empty when nothing leaked."""
        secrets, local_tokens = self._secrets(), set(self.local_tokens)
        deribit_tokens = {t for sim in self._all(Simulator) for t in sim.issued_tokens}
        forbidden = secrets | deribit_tokens | local_tokens
        return [
            *_leaks("output", self._rendered(), forbidden),
            *_leaks("served", map(_issued_removed(local_tokens), self.served), forbidden),
            *_leaks("upstream", self._upstream(), local_tokens | (secrets - self.deribit_secrets)),
        ]

    def clear(self) -> None:
        """Forget everything shown so far, logs and the objects built included: for a test that
        planted a leak on purpose."""
        self.log_lines.stream.seek(0)
        self.log_lines.stream.truncate()
        for recorded in (self.built, self.served, self.errors, self.notified, self.shown):
            recorded.clear()

    def _all(self, cls: type[T]) -> list[T]:
        return [obj for obj in self.built if isinstance(obj, cls)]

    def _secrets(self) -> set[str]:
        from deribit_keeper.gateway import Gateway
        from deribit_keeper.supervisor import Keeper

        found = self.secrets | self.deribit_secrets
        for gateway in self._all(Gateway):
            found.update(c.client_secret.reveal() for c in gateway.config.clients)
        for keeper in self._all(Keeper):
            if keeper.config.http is not None and keeper.config.http.admin_token is not None:
                found.add(keeper.config.http.admin_token.reveal())
        return found

    def _rendered(self) -> Iterator[str]:
        from deribit_keeper.gateway import Gateway
        from deribit_keeper.session import Session
        from deribit_keeper.supervisor import Keeper

        yield self.log_lines.text
        yield from self.notified
        yield from self.shown
        for error in self.errors:
            yield f"{error} {error!r}"
        for obj in self.built:
            yield repr(obj)
            if isinstance(obj, Session):
                yield from (repr(obj.account), str(obj.snapshot()))
            if isinstance(obj, Keeper):
                yield from (repr(obj.config), obj.metrics.render()[0].decode())
            if isinstance(obj, Gateway):
                yield from (repr(obj.auth), repr(obj.config), str(obj.snapshot()))
                yield from (repr(link) for link in obj.links.values())

    def _upstream(self) -> Iterator[str]:
        for sim in self._all(Simulator):
            for conn in sim.connections:
                yield from (f"{method} {params}" for method, params in conn.requests)
            yield from (f"{method} {params}" for method, params in sim.http_requests)


def _leaks(where: str, texts: Iterable[str], forbidden: set[str]) -> list[str]:
    """``where: ...`` for each text holding any of ``forbidden``, with the text around it.

    Plain substring search: with a few dozen secrets and tokens and a test's few hundred kB of
    output, this is milliseconds; a regex alternation would be slower, not faster.
    """
    found = []
    for text in texts:
        leaked = [s for s in forbidden if s in text]
        if leaked:
            at = text.index(leaked[0])
            around = text[max(0, at - 150) : at + len(leaked[0]) + 150]
            found.append(f"{where}: {len(leaked)} secret(s) or token(s), as in {around!r}")
    return found


def _issued_removed(local_tokens: set[str]) -> Callable[[str], str]:
    """Blank the two tokens of a gateway's ``public/auth`` answer, the one place a local token
    is meant to be shown, so that any other appearance of it still counts as a leak."""

    def removed(text: str) -> str:
        if '"access_token"' not in text:
            return text  # the fast path: nearly every frame
        try:
            answer = json.loads(text)
        except ValueError:
            return text
        result = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(result, dict):
            return text
        for key in ("access_token", "refresh_token"):
            if result.get(key) in local_tokens:
                result[key] = "<issued>"
        return json.dumps(answer)

    return removed


@pytest.fixture
def exposure(log_lines: LogLines, monkeypatch: pytest.MonkeyPatch) -> Exposure:
    """The current test's ``Exposure``, recording from the start of the test."""
    found = Exposure(log_lines)
    _watched(found, monkeypatch)
    return found


def _watched(found: Exposure, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap the few places that make objects, tokens, errors and outputs, to record them."""
    from deribit_keeper import serving, systemd
    from deribit_keeper.errors import KeeperError
    from deribit_keeper.gateway import Gateway
    from deribit_keeper.jsonrpc import RpcFault
    from deribit_keeper.session import Session
    from deribit_keeper.supervisor import Keeper

    real_new_token = local_auth.new_token

    def new_token() -> str:
        found.local_tokens.append(real_new_token())
        return found.local_tokens[-1]

    monkeypatch.setattr(local_auth, "new_token", new_token)

    def recording(cls: type[Any], record: list[Any]) -> None:
        real = cls.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            real(self, *args, **kwargs)
            record.append(self)

        monkeypatch.setattr(cls, "__init__", init)

    for cls in (Simulator, Session, Keeper, Gateway):
        recording(cls, found.built)
    real_simulator = Simulator.__init__  # the recording one: it also learns Deribit's secrets

    def simulator(self: Simulator, accounts: Iterable[SimAccount], **kwargs: Any) -> None:
        accounts = list(accounts)
        found.deribit_secrets.update(a.client_secret for a in accounts)
        real_simulator(self, accounts, **kwargs)

    monkeypatch.setattr(Simulator, "__init__", simulator)
    recording(KeeperError, found.errors)
    recording(RpcFault, found.errors)

    # serving.py serves the operations endpoint and every gateway with hypercorn's ``serve``.
    real_serve = hypercorn.trio.serve

    async def serve(app: Any, *args: Any, **kwargs: Any) -> Any:
        async def tapped(scope: Any, receive: Any, send: Any) -> None:
            async def sent(message: dict[str, Any]) -> None:
                found.served.append(_served_text(message))
                await send(message)

            await app(scope, receive, sent)

        return await real_serve(tapped, *args, **kwargs)

    monkeypatch.setattr(serving, "serve", serve)

    real_send = systemd.Notifier.send

    async def notify(self: Any, message: str = "", /, **fields: str | int) -> bool:
        found.notified.append(f"{message} {fields}")
        return await real_send(self, message, **fields)

    monkeypatch.setattr(systemd.Notifier, "send", notify)


def _served_text(message: dict[str, Any]) -> str:
    """The text of one ASGI message a server sent: its body, frame, close reason or headers."""
    parts = []
    for key in ("text", "bytes", "body", "reason"):
        value = message.get(key)
        if isinstance(value, bytes):
            parts.append(value.decode("utf-8", "replace"))
        elif isinstance(value, str):
            parts.append(value)
    for name, value in message.get("headers", ()):
        parts.append(f"{bytes(name).decode('latin-1')}: {bytes(value).decode('latin-1')}")
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def _no_secret_escapes(exposure: Exposure) -> Iterator[None]:
    """Fail any test whose outputs show a secret, or a token a simulator or a gateway issued."""
    yield
    problems = exposure.problems()
    assert not problems, "\n".join(problems)


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Simulator:
    """A simulator on an ephemeral loopback port, serving SIM_ACCOUNTS."""
    simulator = Simulator(list(SIM_ACCOUNTS))
    await nursery.start(simulator.serve, 0)
    return simulator


def account_config(sim: Simulator, name: str = "main", **overrides: Any) -> AccountConfig:
    """An AccountConfig for one of SIM_ACCOUNTS, pointed at ``sim``."""
    sim_account = next(a for a in SIM_ACCOUNTS if a.name == name)
    account = AccountConfig(
        name=name,
        client_id=sim_account.client_id,
        client_secret=Secret(sim_account.client_secret),
        url=sim.url,
        environment=None,
        backoff=BackoffConfig(initial=0.5, max=30.0),
    )
    return dataclasses.replace(account, **overrides)


def keeper_config(*accounts: AccountConfig) -> KeeperConfig:
    return KeeperConfig(
        source=Path("test.yaml"), log=LogConfig(level="debug"), accounts=tuple(accounts)
    )
