# ruff: noqa: E501 - the error table reads best as one case per line
"""Tests for an account's ``gateway`` block (``_config_gateway.py``, loaded through config.py).

As in test_config.py, error cases are parametrised one per rule and assert the exact key path; the
local secrets are distinctive too, and no message, repr or summary may show one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from deribit_keeper.config import (
    AccountConfig,
    GatewayConfig,
    LocalClient,
    Secret,
    describe,
    load_config,
    parse_config,
)
from deribit_keeper.errors import ConfigError

from .test_config import (
    CONFIG_DIR,
    ENV,
    HEDGE,
    MAIN,
    SECRET,
    acct,
    dflt,
    doc,
    error_of,
    everything_printed,
    load,
    secret_file,
    write_config,
)

LOCAL_SECRET = "Engine-LOCAL-secret"
GW_ENV = {**ENV, "ENGINE_SECRET": LOCAL_SECRET, "RESEARCH_SECRET": "Research-LOCAL-secret"}
ENGINE: dict[str, Any] = {"client_id": "engine", "client_secret": "${ENGINE_SECRET}"}
RESEARCH: dict[str, Any] = {"client_id": "research", "client_secret_env": "RESEARCH_SECRET"}
GATEWAY: dict[str, Any] = {"listen": 9601, "clients": [ENGINE]}
OPEN: dict[str, Any] = {"listen": 9601, "auth": "none"}  # no local authentication


def gw(**fields: object) -> dict[str, Any]:
    """GATEWAY with ``fields`` changed; a field given as None is left out."""
    return {k: v for k, v in {**GATEWAY, **fields}.items() if v is not None}


def client(**fields: object) -> dict[str, Any]:
    """ENGINE with ``fields`` changed; a field given as None is left out."""
    return {k: v for k, v in {**ENGINE, **fields}.items() if v is not None}


def with_gateway(gateway: object, account: dict[str, Any] = MAIN) -> dict[str, Any]:
    return {**account, "gateway": gateway}


# ---- errors, one per rule ------------------------------------------------------------------

# fmt: off
ERROR_CASES = [
    # one gateway per account, one listener per port (port 0 aside)
    (dflt(gateway=GATEWAY), "defaults.gateway", "may not be set in defaults; every gateway needs its own port"),
    (doc(with_gateway(GATEWAY), with_gateway(gw(listen="127.0.0.1:9601"), HEDGE)), "accounts[1].gateway.listen", "127.0.0.1:9601 is already accounts[0].gateway.listen"),
    (doc(with_gateway(gw(listen="[::1]:9601")), with_gateway(gw(listen="[0:0::1]:9601"), HEDGE)), "accounts[1].gateway.listen", "[0:0::1]:9601 is already accounts[0].gateway.listen ([::1]:9601)"),
    (doc(with_gateway(GATEWAY), with_gateway(gw(listen="0.0.0.0:9601"), HEDGE)), "accounts[1].gateway.listen", "0.0.0.0:9601 overlaps accounts[0].gateway.listen (127.0.0.1:9601)"),
    (doc(with_gateway(GATEWAY), http={"listen": "127.0.0.1:9601"}), "accounts[0].gateway.listen", "127.0.0.1:9601 is already http.listen"),
    (doc(with_gateway(gw(listen="localhost:9464")), http={"listen": "LOCALHOST:9464"}), "accounts[0].gateway.listen", "localhost:9464 is already http.listen (LOCALHOST:9464)"),
    # how local links authenticate: clients, or auth: none on loopback; never both or neither
    (acct(gateway=gw(listen="0.0.0.0:9601", clients=None, auth="none")), "accounts[0].gateway.auth", "none is only allowed on a loopback listen, not 0.0.0.0:9601 (every interface)"),
    (acct(gateway=gw(listen="10.0.0.5:9601", clients=None, auth="none")), "accounts[0].gateway.auth", "none is only allowed on a loopback listen, not 10.0.0.5:9601 (reachable from other hosts)"),
    (acct(gateway=gw(clients=None)), "accounts[0].gateway", "no local authentication set: list clients, or set auth: none (loopback listen only)"),
    (acct(gateway=gw(auth="none")), "accounts[0].gateway", "clients and auth: none are both set; keep one"),
    (acct(gateway=gw(auth="clients")), "accounts[0].gateway.auth", "must be none (leave it out to require clients); got 'clients'"),
    (acct(gateway=gw(clients=None, auth=False)), "accounts[0].gateway.auth", "must be none (leave it out to require clients); got a bool"),
    # the block's shape
    (acct(gateway=9601), "accounts[0].gateway", "must be a mapping, got an integer"),
    (acct(gateway={"clients": [ENGINE]}), "accounts[0].gateway.listen", "required key is missing"),
    (acct(gateway=gw(listne=9602)), "accounts[0].gateway.listne", "unknown key (did you mean listen?)"),
    (acct(gateway=gw(max_client=8)), "accounts[0].gateway.max_client", "unknown key (did you mean max_clients?)"),
    (acct(gateway=gw(cancel_on_disconect=True)), "accounts[0].gateway.cancel_on_disconect", "unknown key (did you mean cancel_on_disconnect?)"),
    (acct(gateway=gw(listen="127.0.0.1")), "accounts[0].gateway.listen", "has no port: write HOST:PORT, [IPv6]:PORT or a port number, got '127.0.0.1'"),
    (acct(gateway=gw(listen="::1:9601")), "accounts[0].gateway.listen", "an IPv6 address goes in brackets, e.g. [::1]:9464"),
    (acct(gateway=gw(listen=65536)), "accounts[0].gateway.listen", "port must be from 0 to 65535, got 65536"),
    # max_clients and cancel_on_disconnect
    (acct(gateway=gw(max_clients=0)), "accounts[0].gateway.max_clients", "must be an integer from 1 to 1024, got 0"),
    (acct(gateway=gw(max_clients=1025)), "accounts[0].gateway.max_clients", "must be an integer from 1 to 1024, got 1025"),
    (acct(gateway=gw(max_clients=True)), "accounts[0].gateway.max_clients", "must be an integer from 1 to 1024, got a bool"),
    (acct(gateway=gw(max_clients=64.0)), "accounts[0].gateway.max_clients", "must be an integer from 1 to 1024, got a number"),
    (acct(gateway=gw(max_clients="64")), "accounts[0].gateway.max_clients", "must be an integer from 1 to 1024, got a string"),
    (acct(gateway=gw(cancel_on_disconnect="true")), "accounts[0].gateway.cancel_on_disconnect", "must be true or false, got a string"),
    (acct(gateway=gw(cancel_on_disconnect=1)), "accounts[0].gateway.cancel_on_disconnect", "must be true or false, got an integer"),
    # the clients list
    (acct(gateway=gw(clients=[])), "accounts[0].gateway.clients", "must list at least one client"),
    ("defaults: {environment: test}\naccounts:\n  - {name: main, client_id: A, client_secret: x, gateway: {listen: 1, clients: }}\n", "accounts[0].gateway.clients", "must list at least one client"),
    (acct(gateway=gw(clients={"engine": ENGINE})), "accounts[0].gateway.clients", "must be a list of clients, got a mapping"),
    (acct(gateway=gw(clients=["engine"])), "accounts[0].gateway.clients[0]", "must be a mapping, got a string"),
    (acct(gateway=gw(clients=[ENGINE, client(client_secret="other-Secret")])), "accounts[0].gateway.clients[1].client_id", "'engine' is already accounts[0].gateway.clients[0].client_id"),
    (acct(gateway=gw(clients=[client(client_secrets="x")])), "accounts[0].gateway.clients[0].client_secrets", "unknown key (did you mean client_secret?)"),
    # local client ids
    (acct(gateway=gw(clients=[RESEARCH, client(client_id=None)])), "accounts[0].gateway.clients[1].client_id", "required key is missing"),
    (acct(gateway=gw(clients=[RESEARCH, client(client_id="")])), "accounts[0].gateway.clients[1].client_id", "must be non-empty, without whitespace"),
    (acct(gateway=gw(clients=[client(client_id="trading engine")])), "accounts[0].gateway.clients[0].client_id", "must be non-empty, without whitespace"),
    (acct(gateway=gw(clients=[client(client_id="engine\t")])), "accounts[0].gateway.clients[0].client_id", "must be non-empty, without whitespace"),
    (acct(gateway=gw(clients=[client(client_id=7)])), "accounts[0].gateway.clients[0].client_id", "must be a string, got an integer (quote it in YAML)"),
    # local secrets: exactly as an account's
    (acct(gateway=gw(clients=[client(client_secret=None)])), "accounts[0].gateway.clients[0]", "no secret: set one of client_secret, client_secret_file, client_secret_env"),
    (acct(gateway=gw(clients=[client(client_secret_env="ENGINE_SECRET")])), "accounts[0].gateway.clients[0]", "client_secret and client_secret_env are set; keep exactly one"),
    (acct(gateway=gw(clients=[client(client_secret="")])), "accounts[0].gateway.clients[0].client_secret", "the secret from inline is empty"),
    (acct(gateway=gw(clients=[client(client_secret="${EMPTY}")])), "accounts[0].gateway.clients[0].client_secret", "the secret from env EMPTY is empty"),
    (acct(gateway=gw(clients=[client(client_secret="${NOPE}")])), "accounts[0].gateway.clients[0].client_secret", "environment variable NOPE is not set"),
    (acct(gateway=gw(clients=[client(client_secret=LOCAL_SECRET + "\nline")])), "accounts[0].gateway.clients[0].client_secret", "the secret from inline holds more than one line (only one trailing newline is stripped)"),
    (acct(gateway=gw(clients=[client(client_secret=LOCAL_SECRET + " ")])), "accounts[0].gateway.clients[0].client_secret", "the secret from inline has leading or trailing whitespace"),
    (acct(gateway=gw(clients=[client(client_secret=12345678)])), "accounts[0].gateway.clients[0].client_secret", "must be a string, got an integer (quote it in YAML)"),
    (acct(gateway=gw(clients=[{"client_id": "engine", "client_secret_env": "NOPE"}])), "accounts[0].gateway.clients[0].client_secret_env", "environment variable NOPE is not set"),
    # never the account's Deribit secret, however it is written
    (acct(gateway=gw(clients=[RESEARCH, client(client_secret="${MAIN_SECRET}")])), "accounts[0].gateway.clients[1].client_secret", "must not be the account's Deribit secret: a gateway's credentials are local"),
    (acct(gateway=gw(clients=[client(client_secret=SECRET)])), "accounts[0].gateway.clients[0].client_secret", "must not be the account's Deribit secret: a gateway's credentials are local"),
    (acct(gateway=gw(clients=[{"client_id": "engine", "client_secret_env": "MAIN_SECRET"}])), "accounts[0].gateway.clients[0].client_secret_env", "must not be the account's Deribit secret: a gateway's credentials are local"),
]
# fmt: on


@pytest.mark.parametrize(("text", "key_path", "problem"), ERROR_CASES)
def test_each_gateway_rule_raises_config_error_naming_its_key_path(
    text: str, key_path: str, problem: str
) -> None:
    """Every gateway rule gives "<file>: <key path>: <problem>", without any secret in it."""
    exc = error_of(text, environ=GW_ENV)
    assert (exc.file, exc.key_path, exc.problem) == ("config.yaml", key_path, problem)
    assert str(exc) == f"config.yaml: {key_path}: {problem}"
    printed = everything_printed(exc)
    assert SECRET not in printed and LOCAL_SECRET not in printed


def test_a_gateway_error_exits_78_from_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """deribit-keeper check turns a gateway error into one stderr line and exit 78."""
    from deribit_keeper.cli import EX_CONFIG, main

    for name, value in GW_ENV.items():
        monkeypatch.setenv(name, value)
    text = acct(gateway=gw(clients=[client(client_secret="${MAIN_SECRET}")]))
    assert main(["check", "--config", str(write_config(tmp_path, text))]) == EX_CONFIG
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert "accounts[0].gateway.clients[0].client_secret: must not be" in line
    assert SECRET not in captured.err + captured.out


@pytest.mark.parametrize(
    "content",
    [b"", b"\n", LOCAL_SECRET.encode() + b"\nsecond", SECRET.encode() + b"\n"],
)
def test_bad_local_secret_file_is_refused_like_an_account_secret_file(
    tmp_path: Path, content: bytes
) -> None:
    """An empty, multi-line or Deribit-equal secret file is an error naming the key, not the text."""
    (tmp_path / "engine.secret").write_bytes(content)
    text = acct(
        gateway=gw(clients=[{"client_id": "engine", "client_secret_file": "engine.secret"}])
    )
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text), environ=ENV)
    assert info.value.key_path == "accounts[0].gateway.clients[0].client_secret_file"
    printed = everything_printed(info.value)
    assert SECRET not in printed and LOCAL_SECRET not in printed


def test_readable_local_secret_file_loads_with_the_usual_warning(tmp_path: Path) -> None:
    """A local secret file others can read warns exactly as an account's does, naming its key."""
    path = secret_file(tmp_path, 0o644)
    text = acct(gateway=gw(clients=[{"client_id": "engine", "client_secret_file": "f.secret"}]))
    config = load_config(write_config(tmp_path, text), environ=ENV)
    (warning,) = config.warnings
    assert (warning.event, warning.key_path) == (
        "config.secret_file_readable",
        "accounts[0].gateway.clients[0].client_secret_file",
    )
    assert warning.detail == f"{path} is mode 0644; chmod 600 it"


# ---- what a valid block becomes -------------------------------------------------------------


def test_minimal_gateway_gets_documented_defaults_and_leaves_the_account_alone() -> None:
    """listen and one client give loopback, local COD off, 64 links; the account is unchanged."""
    (account,) = load(acct(gateway=GATEWAY), environ=GW_ENV).accounts
    assert account.gateway == GatewayConfig(
        host="127.0.0.1",
        port=9601,
        clients=(LocalClient("engine", Secret(LOCAL_SECRET)),),
        auth="clients",
        cancel_on_disconnect=False,
        max_clients=64,
    )
    (plain,) = load(doc()).accounts
    assert plain.gateway is None
    fields = [f.name for f in dataclasses.fields(AccountConfig) if f.name != "gateway"]
    assert [getattr(account, f) for f in fields] == [getattr(plain, f) for f in fields]


@pytest.mark.parametrize(
    ("listen", "host", "port", "bind"),
    [
        (9601, "127.0.0.1", 9601, "127.0.0.1:9601"),
        ("9601", "127.0.0.1", 9601, "127.0.0.1:9601"),
        (":9601", "127.0.0.1", 9601, "127.0.0.1:9601"),
        ("[::1]:9601", "::1", 9601, "[::1]:9601"),
        ("0.0.0.0:9601", "0.0.0.0", 9601, "0.0.0.0:9601"),
        ("localhost:0", "localhost", 0, "localhost:0"),
    ],
)
def test_gateway_listen_reads_like_http_listen(
    listen: object, host: str, port: int, bind: str
) -> None:
    """A bare port means 127.0.0.1; IPv6 goes in brackets in bind and bare in host."""
    (account,) = load(acct(gateway=gw(listen=listen)), environ=GW_ENV).accounts
    assert account.gateway is not None
    assert (account.gateway.host, account.gateway.port, account.gateway.bind) == (host, port, bind)


@pytest.mark.parametrize("listen", [9601, "localhost:9601", "[::1]:9601", "127.8.9.10:9601"])
def test_auth_none_is_allowed_on_loopback(listen: object) -> None:
    """auth: none means no clients and no local authentication, on a loopback listen."""
    (account,) = load(acct(gateway={**OPEN, "listen": listen})).accounts
    assert account.gateway is not None
    assert (account.gateway.auth, account.gateway.clients) == ("none", ())


def test_local_secrets_come_from_env_file_or_inline_like_an_accounts(tmp_path: Path) -> None:
    """Local secrets come from env, file or inline, as an account's do, and every key is kept."""
    (tmp_path / "ops.secret").write_text("ops-LOCAL-secret\n")
    (tmp_path / "ops.secret").chmod(0o600)
    clients = [
        ENGINE,
        RESEARCH,
        {"client_id": "ops", "client_secret_file": "ops.secret"},
        {"client_id": "lit", "client_secret": "lit-LOCAL-secret"},
    ]
    gateway = {
        "listen": "[::1]:9601",
        "clients": clients,
        "cancel_on_disconnect": True,
        "max_clients": 1024,
    }
    config = load_config(write_config(tmp_path, acct(gateway=gateway)), environ=GW_ENV)
    gw_config = config.accounts[0].gateway
    assert gw_config is not None and config.warnings == ()
    assert (gw_config.cancel_on_disconnect, gw_config.max_clients) == (True, 1024)
    assert [
        (c.client_id, c.client_secret.reveal(), c.secret_source) for c in gw_config.clients
    ] == [
        ("engine", LOCAL_SECRET, "env ENGINE_SECRET"),
        ("research", "Research-LOCAL-secret", "env RESEARCH_SECRET"),
        ("ops", "ops-LOCAL-secret", f"file {tmp_path / 'ops.secret'}"),
        ("lit", "lit-LOCAL-secret", "inline"),
    ]


def test_no_gateway_block_or_an_empty_one_means_no_gateway() -> None:
    """Without a block, or with every line in it commented out, there is no gateway."""
    assert load(doc()).accounts[0].gateway is None
    assert load(acct(gateway={})).accounts[0].gateway is None
    text = doc().replace(
        "client_secret: ${MAIN_SECRET}",
        "client_secret: ${MAIN_SECRET}\n  gateway:\n    # listen: 9601",
    )
    assert "gateway:" in text and load(text).accounts[0].gateway is None


def test_listeners_may_share_a_port_only_on_different_hosts_or_port_zero() -> None:
    """Port 0 never clashes; neither do two loopback addresses; ids may repeat across gateways."""
    text = doc(
        with_gateway(gw(listen=0)),
        with_gateway(gw(listen="127.0.0.1:0"), HEDGE),
        with_gateway(gw(listen="127.0.0.2:9601"), {**HEDGE, "name": "h2"}),
        with_gateway(gw(listen="127.0.0.3:9601"), {**HEDGE, "name": "h3"}),
        http={"listen": 0},
    )
    gateways = [a.gateway for a in load(text, environ=GW_ENV).accounts]
    assert [g.bind for g in gateways if g] == [
        "127.0.0.1:0",
        "127.0.0.1:0",
        "127.0.0.2:9601",
        "127.0.0.3:9601",
    ]
    assert all(g and g.clients[0].client_id == "engine" for g in gateways)


# ---- equality: what a reload compares ----------------------------------------------------------


def test_account_equality_ignores_the_gateway() -> None:
    """An account with, without or with another gateway is equal: the session need not restart."""
    (plain,) = load(doc()).accounts
    (one,) = load(acct(gateway=GATEWAY), environ=GW_ENV).accounts
    (other,) = load(acct(gateway=OPEN)).accounts
    assert plain == one == other and hash(plain) == hash(one) == hash(other)
    assert one.gateway != other.gateway


def test_gateway_equality_sees_a_changed_local_secret_but_not_its_source() -> None:
    """Changing a local secret changes the gateway; moving it from env to inline does not."""
    (env,) = load(acct(gateway=GATEWAY), environ=GW_ENV).accounts
    (inline,) = load(acct(gateway=gw(clients=[client(client_secret=LOCAL_SECRET)]))).accounts
    (changed,) = load(acct(gateway=gw(clients=[client(client_secret="new-LOCAL-secret")]))).accounts
    assert env.gateway == inline.gateway and hash(env.gateway) == hash(inline.gateway)
    assert env.gateway is not None and inline.gateway is not None
    assert env.gateway.clients[0].secret_source != inline.gateway.clients[0].secret_source
    assert env.gateway != changed.gateway


@pytest.mark.parametrize(
    "change",
    [
        {"listen": 9602},
        {"max_clients": 8},
        {"cancel_on_disconnect": True},
        {"clients": [ENGINE, RESEARCH]},
    ],
)
def test_gateway_equality_sees_every_other_key(change: dict[str, Any]) -> None:
    """Any other change to the block also makes the gateways unequal."""
    (before,) = load(acct(gateway=GATEWAY), environ=GW_ENV).accounts
    (after,) = load(acct(gateway={**GATEWAY, **change}), environ=GW_ENV).accounts
    assert before.gateway != after.gateway


# ---- describe: what `deribit-keeper check` prints -------------------------------------------------


def test_describe_shows_each_gateway_without_secrets(tmp_path: Path) -> None:
    """Each account ends with its gateway: URL, reach, clients and their secret sources, COD, links."""
    (tmp_path / "ops.secret").write_text("ops-LOCAL-secret\n")
    (tmp_path / "ops.secret").chmod(0o600)
    clients = [
        ENGINE,
        {"client_id": "ops", "client_secret_file": "ops.secret"},
        client(client_id="lit", client_secret="lit-LOCAL-secret"),
    ]
    accounts = [
        with_gateway(gw(clients=clients)),
        with_gateway(
            {**OPEN, "listen": "[::1]:9602", "cancel_on_disconnect": True, "max_clients": 8}, HEDGE
        ),
        with_gateway(gw(listen="0.0.0.0:9603"), {**HEDGE, "name": "wide"}),
        {**HEDGE, "name": "plain"},
    ]
    config = load_config(write_config(tmp_path, doc(*accounts)), environ=GW_ENV)
    lines = describe(config)
    assert [line for line in lines if line.startswith("  gateway:")] == [
        "  gateway: ws://127.0.0.1:9601/ws/api/v2 (loopback only); clients: engine (secret: env ENGINE_SECRET), "
        f"ops (secret: file {tmp_path / 'ops.secret'}), lit (secret: inline); local COD off; max 64 links",
        "  gateway: ws://[::1]:9602/ws/api/v2 (loopback only); no local authentication; local COD on; max 8 links",
        "  gateway: ws://0.0.0.0:9603/ws/api/v2 (every interface); clients: engine (secret: env ENGINE_SECRET); local COD off; max 64 links",
        "  gateway: off",
    ]
    assert lines[lines.index("account wide:") - 1].startswith("  gateway: ws://[::1]:9602/")
    shown = repr(config) + str(config) + "\n".join(lines)
    for secret in (SECRET, LOCAL_SECRET, "ops-LOCAL-secret", "lit-LOCAL-secret"):
        assert secret not in shown


# ---- the shipped example -----------------------------------------------------------------------


def example_with_gateway(directory: Path, *, open_: bool = False) -> GatewayConfig | None:
    """main's gateway in example.yaml with its block uncommented; ``open_`` swaps clients for
    ``auth: none``. The example's hedge secret file is written to ``directory``."""
    text = (CONFIG_DIR / "example.yaml").read_text()
    start = text.index("    # gateway:\n")
    end = text.index("\n\n", start)
    block = [line.replace("    # ", "    ", 1) for line in text[start:end].splitlines()]
    if open_:
        first = next(i for i, line in enumerate(block) if line.startswith("      clients:"))
        last = next(i for i, line in enumerate(block) if "exactly as for accounts" in line)
        del block[first : last + 1]
        block = [line.replace("      # auth: none", "      auth: none") for line in block]
    (directory / "hedge.secret").write_text("hedge-from-file\n")
    environ = {"DERIBIT_MAIN_SECRET": "main-from-env", "DERIBIT_ENGINE_SECRET": LOCAL_SECRET}
    text = text[:start] + "\n".join(block) + text[end:]
    config = parse_config(text, source=directory / "example.yaml", environ=environ)
    return config.accounts[0].gateway


def test_example_gateway_block_loads_when_uncommented(tmp_path: Path) -> None:
    """The example's commented gateway gives what its comments promise, with clients or without."""
    assert example_with_gateway(tmp_path) == GatewayConfig(
        host="127.0.0.1", port=9601, clients=(LocalClient("engine", Secret(LOCAL_SECRET)),)
    )
    assert example_with_gateway(tmp_path, open_=True) == GatewayConfig(
        host="127.0.0.1", port=9601, auth="none"
    )


# ---- no secret in any output -------------------------------------------------------------------

LEAKY_CASES = [
    acct(gateway=gw(clients=[client(client_secret=[LOCAL_SECRET])])),
    acct(gateway=gw(clients=[client(client_secret={LOCAL_SECRET: LOCAL_SECRET})])),
    acct(gateway=gw(clients=[client(client_secret=LOCAL_SECRET, client_secret_env="X")])),
    acct(gateway=gw(clients=[client(client_secret=LOCAL_SECRET, client_secretz=1)])),
    acct(gateway=gw(clients=[client(client_secret=LOCAL_SECRET + "${NOPE}")])),
    acct(gateway=gw(clients=[client(client_id="", client_secret=LOCAL_SECRET)])),
    acct(gateway=gw(clients=[client(client_secret=LOCAL_SECRET)], auth="none")),
    acct(
        gateway=gw(clients=[client(client_secret=LOCAL_SECRET), client(client_secret=LOCAL_SECRET)])
    ),
    acct(client_secret=LOCAL_SECRET, gateway=gw(clients=[client(client_secret=LOCAL_SECRET)])),
]


@pytest.mark.parametrize("text", LEAKY_CASES)
def test_no_gateway_error_ever_contains_a_local_secret(text: str) -> None:
    """Whatever is wrong in a gateway block, no message or chained exception quotes a secret."""
    printed = everything_printed(error_of(text, environ=GW_ENV))
    assert SECRET not in printed
    assert LOCAL_SECRET not in printed
