"""Shared fixtures, and the policy every test here follows.

* Real sockets on loopback only, always port 0: the simulator runs in the test's own Trio loop.
* Anything involving time runs on trio's ``autojump_clock``: hours of heartbeats take
  milliseconds and no test really sleeps. (A few CLI tests run a real process in real time; they
  wait on its output, never on a fixed delay.)
* Logs go through the real processor chain (``logs.configure``) into a buffer that tests read as
  JSON events, so redaction is exercised by every test that logs.
* No secret and no token reaches any output: after every test, its log lines, the repr of every
  Keeper, Session and config it built, and every session snapshot (what /status serves) are
  searched for every secret its simulators knew and every token they issued.
* structlog is reset after every test.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(autouse=True)
def _no_secret_escapes(log_lines: LogLines, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any test whose output shows a secret, or a token a simulator or a gateway issued."""
    from deribit_keeper.gateway import Gateway
    from deribit_keeper.session import Session
    from deribit_keeper.supervisor import Keeper

    simulators: list[Simulator] = []
    secrets: set[str] = set(SECRETS)
    built: list[object] = []
    local_tokens: list[str] = []
    real_new_token = local_auth.new_token

    def new_token() -> str:
        local_tokens.append(real_new_token())
        return local_tokens[-1]

    monkeypatch.setattr(local_auth, "new_token", new_token)

    def recording(cls: type[Any], record: Any) -> None:
        real = cls.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            real(self, *args, **kwargs)
            record(self, args)

        monkeypatch.setattr(cls, "__init__", init)

    def simulator_built(sim: Simulator, args: tuple[Any, ...]) -> None:
        simulators.append(sim)
        secrets.update(a.client_secret for a in (args[0] if args else ()))

    recording(Simulator, simulator_built)
    recording(Session, lambda obj, _args: built.append(obj))
    recording(Keeper, lambda obj, _args: built.append(obj))
    recording(Gateway, lambda obj, _args: built.append(obj))
    yield
    rendered = [log_lines.text]
    for obj in built:
        rendered.append(repr(obj))
        if isinstance(obj, Session):
            rendered += [repr(obj.account), str(obj.snapshot())]
        if isinstance(obj, Keeper):
            rendered.append(repr(obj.config))
        if isinstance(obj, Gateway):
            rendered += [repr(obj.auth), repr(obj.config), str(obj.snapshot())]
            rendered += [repr(link) for link in obj.links.values()]
    tokens = {token for sim in simulators for token in sim.issued_tokens} | set(local_tokens)
    for text in rendered:
        leaked = [s for s in secrets | tokens if s in text]
        assert not leaked, f"a secret or token reached the output: {text[:200]!r}"


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
