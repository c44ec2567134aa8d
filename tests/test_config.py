# ruff: noqa: E501 - the error table reads best as one case per line
"""Tests for config.py: one strict loader from YAML to frozen dataclasses, and the Secret type.

Error cases are parametrised, one per rule, and each asserts the exact key path the message names.
Secret values used here are distinctive so that a leak into any message is easy to catch.
"""

from __future__ import annotations

import copy
import pickle
import shutil
import string
import textwrap
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deribit_keeper.config import (
    SECRET_FILE_READABLE,
    AccountConfig,
    BackoffConfig,
    ConfigWarning,
    HttpConfig,
    KeeperConfig,
    LogConfig,
    Secret,
    default_config_path,
    describe,
    load_config,
    parse_config,
)
from deribit_keeper.errors import ConfigError
from deribit_keeper.protocol import PROD_URL, TEST_URL

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
SECRET = "Hunter2-SECRET-value"
ENV = {"MAIN_SECRET": SECRET, "EMPTY": "", "CLIENT": "AbCdEf12"}
MAIN: dict[str, Any] = {"name": "main", "client_id": "AbCdEf12", "client_secret": "${MAIN_SECRET}"}
HEDGE: dict[str, Any] = {
    "name": "hedge",
    "client_id": "XyZ98765",
    "client_secret_env": "MAIN_SECRET",
}


def doc(*accounts: dict[str, Any], defaults: object = None, **top: object) -> str:
    """YAML for a config with ``accounts`` (default: MAIN) and ``defaults`` (default: testnet)."""
    document: dict[str, object] = {
        "defaults": {"environment": "test"} if defaults is None else defaults,
        "accounts": list(accounts) or [MAIN],
        **top,
    }
    return yaml.safe_dump(document, sort_keys=False)


def acct(**fields: object) -> str:
    """YAML for one account: MAIN with ``fields`` changed."""
    return doc({**MAIN, **fields})


def dflt(**fields: object) -> str:
    """YAML for MAIN on testnet with ``fields`` added to defaults."""
    return doc(defaults={"environment": "test", **fields})


def load(text: str, *, environ: dict[str, str] | None = None) -> KeeperConfig:
    return parse_config(
        text, source=Path("config.yaml"), environ=ENV if environ is None else environ
    )


def error_of(text: str, *, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, environ=environ)
    return info.value


def everything_printed(exc: BaseException) -> str:
    """All a traceback would show, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


# ---- errors, one per rule ------------------------------------------------------------------

# fmt: off
ERROR_CASES = [
    # numbers: range, type (a bool is not a number), finiteness
    (doc(MAIN, {**HEDGE, "heartbeat_interval": 5}), "accounts[1].heartbeat_interval", "must be >= 10, got 5"),
    (acct(heartbeat_interval=3601), "accounts[0].heartbeat_interval", "must be <= 3600, got 3601"),
    (acct(heartbeat_interval=True), "accounts[0].heartbeat_interval", "must be a number of seconds, got a bool"),
    (acct(heartbeat_interval="10"), "accounts[0].heartbeat_interval", "must be a number of seconds, got a string"),
    (acct(heartbeat_interval=float("nan")), "accounts[0].heartbeat_interval", "must be a finite number, got nan"),
    (acct(request_timeout=0), "accounts[0].request_timeout", "must be > 0, got 0"),
    (acct(request_timeout=300.5), "accounts[0].request_timeout", "must be <= 300, got 300.5"),
    (acct(request_timeout=None), "accounts[0].request_timeout", "must be a number of seconds, got null"),
    (dflt(heartbeat_interval=5), "defaults.heartbeat_interval", "must be >= 10, got 5"),
    (acct(cod_check_interval=4), "accounts[0].cod_check_interval", "must be >= 5, got 4"),
    (dflt(cod_check_interval="60"), "defaults.cod_check_interval", "must be a number of seconds, got a string"),
    (acct(on_start="cancel"), "accounts[0].on_start", "must be one of keep, cancel_all; got 'cancel'"),
    (doc(http={"admin_token_file": "admin.token"}), "http.admin_token_file", "needs http.listen: nothing serves it"),
    # backoff: range, order, shape
    (acct(backoff={"initial": 0}), "accounts[0].backoff.initial", "must be > 0, got 0"),
    (acct(backoff={"max": 3601}), "accounts[0].backoff.max", "must be <= 3600, got 3601"),
    (acct(backoff={"initial": 5, "max": 1}), "accounts[0].backoff.max", "must be >= backoff.initial (5), got 1"),
    (acct(backoff={"initial": 40}), "accounts[0].backoff.initial", "must be <= backoff.max (30), got 40"),
    (doc({**MAIN, "backoff": {"initial": 40}}, defaults={"environment": "test", "backoff": {"max": 20}}), "accounts[0].backoff.initial", "must be <= backoff.max (20), got 40"),
    (doc({**MAIN, "backoff": {"max": 1}}, defaults={"environment": "test", "backoff": {"initial": 2}}), "accounts[0].backoff.max", "must be >= backoff.initial (2), got 1"),
    (dflt(backoff={"initial": 2, "max": 1}), "defaults.backoff.max", "must be >= backoff.initial (2), got 1"),
    (acct(backoff=5), "accounts[0].backoff", "must be a mapping, got an integer"),
    (acct(backoff={"maximum": 3}), "accounts[0].backoff.maximum", "unknown key (did you mean max?)"),
    # unknown keys anywhere, with a suggestion when one is close
    (doc(MAIN, {**HEDGE, "heartbeat_intervall": 10}), "accounts[1].heartbeat_intervall", "unknown key (did you mean heartbeat_interval?)"),
    (dflt(timeout=5), "defaults.timeout", "unknown key (did you mean request_timeout?)"),
    (dflt(frobnicate=5), "defaults.frobnicate", "unknown key"),
    (doc(account=[MAIN]), "account", "unknown key (did you mean accounts?)"),
    (doc(log={"lvl": "info"}), "log.lvl", "unknown key (did you mean level?)"),
    (acct(name="main").replace("- name:", "- 1: x\n  name:"), "accounts[0]", "keys must be strings, got an integer"),
    # enumerations
    (doc(log={"level": "INFO"}), "log.level", "must be one of debug, info, warning, error; got 'INFO'"),
    (doc(log={"format": "text"}), "log.format", "must be one of json, console; got 'text'"),
    (acct(environment="staging"), "accounts[0].environment", "must be one of test, prod; got 'staging'"),
    (acct(auth="oauth"), "accounts[0].auth", "must be one of signature, credentials; got 'oauth'"),
    (acct(cancel_on_disconnect="session"), "accounts[0].cancel_on_disconnect", "must be one of connection, account; got 'session'"),
    (acct(on_shutdown=False), "accounts[0].on_shutdown", "must be one of close, logout; got a bool"),
    (doc({**MAIN, "url": "ws://127.0.0.1:1/ws"}, defaults={"environment": "staging"}), "defaults.environment", "must be one of test, prod; got 'staging'"),
    # endpoint
    (doc(defaults={}), "accounts[0]", "no endpoint: set environment (test|prod) or url"),
    (acct(url="https://test.deribit.com/ws/api/v2"), "accounts[0].url", "must be a wss:// URL (ws:// only for a loopback host)"),
    (acct(url="ws://test.deribit.com/ws/api/v2"), "accounts[0].url", "ws:// is only allowed to a loopback host (127.0.0.0/8, ::1, localhost); use wss://"),
    (acct(url="ws://10.0.0.1:8765/ws/api/v2"), "accounts[0].url", "ws:// is only allowed to a loopback host (127.0.0.0/8, ::1, localhost); use wss://"),
    (acct(url="ws://0.0.0.0:8765/ws/api/v2"), "accounts[0].url", "ws:// is only allowed to a loopback host (127.0.0.0/8, ::1, localhost); use wss://"),
    (acct(url="wss:///ws/api/v2"), "accounts[0].url", "has no host"),
    (acct(url="wss://u:p@test.deribit.com/ws"), "accounts[0].url", "must not contain user:password@"),
    (acct(url="wss://test.deribit.com:99999/ws"), "accounts[0].url", "is not a valid URL"),
    (acct(url="wss://test.deribit.com/ws?token=x"), "accounts[0].url", "must not have a ?query or #fragment"),
    (acct(url="wss://test.deribit.com/ws api"), "accounts[0].url", "must not contain whitespace"),
    (acct(url=8765), "accounts[0].url", "must be a string, got an integer (quote it in YAML)"),
    # names and client ids
    (acct(name="main account"), "accounts[0].name", "must be 1 to 64 characters from A-Z a-z 0-9 _ . -, got 'main account'"),
    (acct(name="a" * 65), "accounts[0].name", f"must be 1 to 64 characters from A-Z a-z 0-9 _ . -, got '{'a' * 65}'"),
    (acct(name=7), "accounts[0].name", "must be a string, got an integer (quote it in YAML)"),
    (doc(MAIN, {**HEDGE, "name": "main"}), "accounts[1].name", "'main' is already accounts[0].name"),
    (doc({k: v for k, v in MAIN.items() if k != "name"}), "accounts[0].name", "required key is missing"),
    (doc({k: v for k, v in MAIN.items() if k != "client_id"}), "accounts[0].client_id", "required key is missing"),
    (acct(client_id=""), "accounts[0].client_id", "must be non-empty, without whitespace"),
    (acct(client_id=12345678), "accounts[0].client_id", "must be a string, got an integer (quote it in YAML)"),
    (acct(client_id="${NOPE}"), "accounts[0].client_id", "environment variable NOPE is not set"),
    # secrets: exactly one, never in defaults, ${VAR} and client_secret_env rules
    (doc({k: v for k, v in MAIN.items() if k != "client_secret"}), "accounts[0]", "no secret: set one of client_secret, client_secret_file, client_secret_env"),
    (acct(client_secret_env="MAIN_SECRET"), "accounts[0]", "client_secret and client_secret_env are set; keep exactly one"),
    (dflt(client_secret="${MAIN_SECRET}"), "defaults.client_secret", "may not be set in defaults; give each account its own"),
    (dflt(client_secret_file="x"), "defaults.client_secret_file", "may not be set in defaults; give each account its own"),
    (dflt(client_secret_env="X"), "defaults.client_secret_env", "may not be set in defaults; give each account its own"),
    (dflt(client_id="X"), "defaults.client_id", "may not be set in defaults; it names one account"),
    (dflt(name="X"), "defaults.name", "may not be set in defaults; it names one account"),
    (acct(client_secret="${NOPE}"), "accounts[0].client_secret", "environment variable NOPE is not set"),
    (acct(client_secret="${MAIN_SECRET"), "accounts[0].client_secret", "has a ${ without its closing }"),
    (acct(client_secret="${1BAD}"), "accounts[0].client_secret", "${...} must hold an environment variable name"),
    (acct(client_secret="${EMPTY}"), "accounts[0].client_secret", "the secret from env EMPTY is empty"),
    (acct(client_secret=""), "accounts[0].client_secret", "the secret from inline is empty"),
    (acct(client_secret=12345678), "accounts[0].client_secret", "must be a string, got an integer (quote it in YAML)"),
    (acct(client_secret="a b "), "accounts[0].client_secret", "the secret from inline has leading or trailing whitespace"),
    (doc({**HEDGE, "client_secret_env": "NOPE"}), "accounts[0].client_secret_env", "environment variable NOPE is not set"),
    (doc({**HEDGE, "client_secret_env": "${MAIN_SECRET}"}), "accounts[0].client_secret_env", "must be an environment variable name"),
    (doc({**HEDGE, "client_secret_env": "EMPTY"}), "accounts[0].client_secret_env", "the secret from env EMPTY is empty"),
    (doc({**HEDGE, "client_secret_env": None, "name": "h"}), "accounts[0].client_secret_env", "must be a string, got null"),
    # http: one key; listen is HOST:PORT, [IPv6]:PORT, :PORT or a port (an integer or digits)
    (doc(http={"listen": "127.0.0.1"}), "http.listen", "has no port: write HOST:PORT, [IPv6]:PORT or a port number, got '127.0.0.1'"),
    (doc(http={"listen": "localhost"}), "http.listen", "has no port: write HOST:PORT, [IPv6]:PORT or a port number, got 'localhost'"),
    (doc(http={"listen": "127.0.0.1:"}), "http.listen", "has no port: write HOST:PORT, [IPv6]:PORT or a port number, got '127.0.0.1:'"),
    (doc(http={"listen": "[::1]"}), "http.listen", "has no port: write HOST:PORT, [IPv6]:PORT or a port number, got '[::1]'"),
    (doc(http={"listen": ":"}), "http.listen", "has no port: write HOST:PORT, [IPv6]:PORT or a port number, got ':'"),
    (doc(http={"listen": 65536}), "http.listen", "port must be from 0 to 65535, got 65536"),
    (doc(http={"listen": -1}), "http.listen", "port must be from 0 to 65535, got -1"),
    (doc(http={"listen": "127.0.0.1:65536"}), "http.listen", "port must be from 0 to 65535, got 65536"),
    (doc(http={"listen": "127.0.0.1:http"}), "http.listen", "port must be a number from 0 to 65535, got 'http'"),
    (doc(http={"listen": "127.0.0.1:-1"}), "http.listen", "port must be a number from 0 to 65535, got '-1'"),
    (doc(http={"listen": "127.0.0.1:\u00b2"}), "http.listen", "port must be a number from 0 to 65535, got '\u00b2'"),
    (doc(http={"listen": "::1:9464"}), "http.listen", "an IPv6 address goes in brackets, e.g. [::1]:9464"),
    (doc(http={"listen": "[127.0.0.1]:9464"}), "http.listen", "[...] must hold an IPv6 address, got '127.0.0.1'"),
    (doc(http={"listen": "[::1]9464"}), "http.listen", "must be [IPv6]:PORT, got '[::1]9464'"),
    (doc(http={"listen": "keeper_1:9464"}), "http.listen", "host must be an IP address or a hostname, got 'keeper_1'"),
    (doc(http={"listen": "999.0.0.1:9464"}), "http.listen", "host must be an IP address or a hostname, got '999.0.0.1'"),
    (doc(http={"listen": "127.0.0.1 :9464"}), "http.listen", "must not contain whitespace"),
    (doc(http={"listen": ""}), "http.listen", "must be HOST:PORT, [IPv6]:PORT or a port number, got an empty string"),
    (doc(http={"listen": 9464.0}), "http.listen", "must be HOST:PORT, [IPv6]:PORT or a port number, got a number"),
    (doc(http={"listen": True}), "http.listen", "must be HOST:PORT, [IPv6]:PORT or a port number, got a bool"),
    (doc(http={"listen": None}), "http.listen", "must be HOST:PORT, [IPv6]:PORT or a port number, got null"),
    (doc(http={"listen": ["127.0.0.1", 9464]}), "http.listen", "must be HOST:PORT, [IPv6]:PORT or a port number, got a list"),
    (doc(http={"listen": 9464, "lisen": 9465}), "http.lisen", "unknown key (did you mean listen?)"),
    (doc(http={"port": 9464}), "http.port", "unknown key"),
    (doc(http="127.0.0.1:9464"), "http", "must be a mapping, got a string"),
    # document shape
    (doc(MAIN)[: doc(MAIN).index("accounts")], "accounts", "missing: list at least one account"),
    ("defaults: {environment: test}\naccounts: []\n", "accounts", "must list at least one account"),
    ("accounts:\n", "accounts", "must list at least one account"),
    ("accounts: {main: {}}\n", "accounts", "must be a list of accounts, got a mapping"),
    ("accounts: [main]\n", "accounts[0]", "must be a mapping, got a string"),
    ("log: 5\naccounts: []\n", "log", "must be a mapping, got an integer"),
    ("defaults: [1]\naccounts: []\n", "defaults", "must be a mapping, got a list"),
    ("- accounts\n", "", "the top level must be a mapping, got a list"),
    ("", "", "the file is empty; expected a mapping with an accounts list"),
    ("# nothing but a comment\n", "", "the file is empty; expected a mapping with an accounts list"),
    # YAML itself: syntax (with the line), duplicate keys, values PyYAML cannot build
    ("log:\n\tlevel: info\n", "", "invalid YAML at line 2, column 1: found character '\\t' that cannot start any token"),
    ("accounts:\n  - name: main\n    client_id: a\n    client_id: b\n", "", "invalid YAML at line 4: duplicate key 'client_id'"),
    ("accounts: [\n", "", "invalid YAML at line 2, column 1: expected the node content, but found '<stream end>'"),
    ("log: {level: info}\nlog: {level: debug}\n", "", "invalid YAML at line 2: duplicate key 'log'"),
    ("accounts: 2024-13-45\n", "", "invalid YAML: cannot build the document (ValueError)"),
    ("accounts: !!python/object:os.system x\n", "", "invalid YAML at line 1, column 11: could not determine a constructor for the tag '...'"),
]
# fmt: on


@pytest.mark.parametrize(("text", "key_path", "problem"), ERROR_CASES)
def test_each_rule_raises_config_error_naming_file_and_key_path(
    text: str, key_path: str, problem: str
) -> None:
    """Every rule violation is a ConfigError reading "<file>: <key path>: <problem>"."""
    exc = error_of(text)
    assert (exc.file, exc.key_path, exc.problem) == ("config.yaml", key_path, problem)
    assert str(exc) == ("config.yaml: " + (f"{key_path}: " if key_path else "") + problem)


def test_heartbeat_message_matches_the_documented_example() -> None:
    """The message from the issue reads exactly as documented."""
    exc = error_of(doc(MAIN, {**HEDGE, "heartbeat_interval": 5}))
    assert str(exc) == "config.yaml: accounts[1].heartbeat_interval: must be >= 10, got 5"


# ---- what a valid file becomes --------------------------------------------------------------


def test_minimal_account_gets_documented_defaults() -> None:
    """An account with only name, client_id and a secret gets every documented default."""
    config = load(doc())
    assert config.log == LogConfig(level="info", format="json")
    (account,) = config.accounts
    assert account == AccountConfig(
        name="main",
        client_id="AbCdEf12",
        client_secret=Secret(SECRET),
        url=TEST_URL,
        environment="test",
        auth="signature",
        heartbeat_interval=10.0,
        cancel_on_disconnect="connection",
        on_shutdown="close",
        request_timeout=5.0,
        backoff=BackoffConfig(initial=0.5, max=30.0),
    )
    assert config.source == Path("config.yaml")


def test_defaults_apply_and_accounts_override_them() -> None:
    """A key in defaults applies to every account unless the account sets it itself."""
    defaults = {
        "environment": "prod",
        "auth": "credentials",
        "heartbeat_interval": 20,
        "cancel_on_disconnect": "account",
        "on_shutdown": "logout",
        "request_timeout": 7,
        "backoff": {"initial": 1, "max": 10},
    }
    own = {"heartbeat_interval": 30, "auth": "signature", "on_shutdown": "close"}
    main, hedge = load(doc(MAIN, {**HEDGE, **own}, defaults=defaults)).accounts
    assert (main.url, main.environment, main.auth, main.heartbeat_interval) == (
        PROD_URL,
        "prod",
        "credentials",
        20.0,
    )
    assert (main.cancel_on_disconnect, main.on_shutdown, main.request_timeout) == (
        "account",
        "logout",
        7.0,
    )
    assert (hedge.auth, hedge.heartbeat_interval, hedge.on_shutdown) == ("signature", 30.0, "close")
    assert hedge.cancel_on_disconnect == "account"


def test_backoff_merges_key_by_key() -> None:
    """An account's backoff overrides only the keys it names; the rest come from defaults."""
    defaults = {"environment": "test", "backoff": {"initial": 2, "max": 60}}
    main, hedge = load(doc({**MAIN, "backoff": {"max": 5}}, HEDGE, defaults=defaults)).accounts
    assert main.backoff == BackoffConfig(initial=2.0, max=5.0)
    assert hedge.backoff == BackoffConfig(initial=2.0, max=60.0)


def test_integers_become_floats_for_seconds() -> None:
    """Whole numbers are accepted for seconds and stored as floats."""
    (account,) = load(doc({**MAIN, "heartbeat_interval": 15, "request_timeout": 1})).accounts
    assert type(account.heartbeat_interval) is float and account.heartbeat_interval == 15.0
    assert type(account.request_timeout) is float


def test_limits_themselves_are_accepted() -> None:
    """The documented bounds are inclusive where stated: 10 and 3600 s, 300 s, 3600 s."""
    own = {"heartbeat_interval": 3600, "request_timeout": 300, "backoff": {"max": 3600}}
    (account,) = load(doc({**MAIN, **own})).accounts
    assert (account.heartbeat_interval, account.request_timeout, account.backoff.max) == (
        3600.0,
        300.0,
        3600.0,
    )
    assert load(doc({**MAIN, "heartbeat_interval": 10})).accounts[0].heartbeat_interval == 10.0


def test_url_overrides_environment_in_the_same_place() -> None:
    """An explicit url wins over environment, and environment is then None."""
    defaults = {"environment": "prod", "url": "ws://127.0.0.1:8765/ws/api/v2"}
    (account,) = load(doc(defaults=defaults)).accounts
    assert (account.url, account.environment) == ("ws://127.0.0.1:8765/ws/api/v2", None)


def test_account_endpoint_replaces_both_endpoint_defaults() -> None:
    """An account naming environment (or url) inherits neither endpoint key from defaults."""
    defaults = {"url": "ws://127.0.0.1:8765/ws/api/v2"}
    main, hedge = load(doc({**MAIN, "environment": "prod"}, HEDGE, defaults=defaults)).accounts
    assert (main.url, main.environment) == (PROD_URL, "prod")
    assert (hedge.url, hedge.environment) == ("ws://127.0.0.1:8765/ws/api/v2", None)


@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:8765/ws/api/v2",
        "ws://127.1.2.3/ws/api/v2",
        "ws://[::1]:8765/ws/api/v2",
        "ws://localhost:8765/ws/api/v2",
        "ws://LOCALHOST/ws/api/v2",
        "ws://127.0.0.1:0/ws/api/v2",
        "wss://test.deribit.com/ws/api/v2",
        "wss://10.0.0.1:9443/ws/api/v2",
        "WSS://www.deribit.com/ws/api/v2",
    ],
)
def test_loopback_ws_and_any_wss_urls_are_accepted(url: str) -> None:
    """ws:// is accepted for 127.0.0.0/8, ::1 and localhost; wss:// for any host."""
    assert load(doc({**MAIN, "url": url})).accounts[0].url == url


def test_empty_log_and_defaults_sections_are_accepted() -> None:
    """A section whose lines are all commented out counts as empty, not as an error."""
    text = "log:\ndefaults:\n  # url: ws://127.0.0.1:8765/ws/api/v2\naccounts:\n" + textwrap.indent(
        yaml.safe_dump([{**MAIN, "environment": "test"}]), "  "
    )
    config = load(text)
    assert config.log == LogConfig() and config.accounts[0].environment == "test"


def test_yaml_anchors_and_merge_keys_work() -> None:
    """YAML merge keys may share settings without tripping the duplicate-key check."""
    text = textwrap.dedent(
        """\
        defaults: {environment: test}
        accounts:
          - &base {name: main, client_id: A, client_secret: "${MAIN_SECRET}", heartbeat_interval: 20}
          - <<: *base
            name: hedge
        """
    )
    main, hedge = load(text).accounts
    assert (hedge.name, hedge.heartbeat_interval, hedge.client_secret) == (
        "hedge",
        20.0,
        main.client_secret,
    )


# ---- the three secret forms -------------------------------------------------------------------


def test_client_secret_takes_vars_from_the_environment() -> None:
    """client_secret and client_id expand ${VAR}; the source says which variable."""
    (account,) = load(doc({**MAIN, "client_id": "${CLIENT}"})).accounts
    assert account.client_id == "AbCdEf12"
    assert account.client_secret.reveal() == SECRET
    assert account.secret_source == "env MAIN_SECRET"


def test_client_secret_may_mix_text_and_vars() -> None:
    """Text around a ${VAR} is kept, and the source says it was inline."""
    (account,) = load(doc({**MAIN, "client_secret": "x-${MAIN_SECRET}-y"})).accounts
    assert account.client_secret.reveal() == f"x-{SECRET}-y"
    assert account.secret_source == "inline with env MAIN_SECRET"


def test_inline_client_secret_is_taken_as_written() -> None:
    """A literal client_secret is used verbatim and reported as inline."""
    (account,) = load(doc({**MAIN, "client_secret": "literal-Secret"})).accounts
    assert (account.client_secret.reveal(), account.secret_source) == ("literal-Secret", "inline")


def test_client_secret_env_names_the_variable() -> None:
    """client_secret_env reads the named variable."""
    (account,) = load(doc(HEDGE)).accounts
    assert (account.client_secret.reveal(), account.secret_source) == (SECRET, "env MAIN_SECRET")


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit environ, ${VAR} comes from os.environ."""
    monkeypatch.setenv("MAIN_SECRET", "from-os-environ")
    config = parse_config(doc(), source=Path("config.yaml"))
    assert config.accounts[0].client_secret.reveal() == "from-os-environ"


def write_config(directory: Path, text: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(text)
    return path


FILE_ACCOUNT: dict[str, Any] = {"name": "f", "client_id": "F1", "client_secret_file": "f.secret"}


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        (b"file-Secret\n", "file-Secret"),
        (b"file-Secret", "file-Secret"),
        (b"file-Secret\r\n", "file-Secret"),
    ],
)
def test_secret_file_loses_one_trailing_newline(
    tmp_path: Path, content: bytes, secret: str
) -> None:
    """A secret file's single trailing newline (LF or CRLF) is stripped."""
    (tmp_path / "f.secret").write_bytes(content)
    config = load_config(write_config(tmp_path, doc(FILE_ACCOUNT)), environ={})
    (account,) = config.accounts
    assert account.client_secret.reveal() == secret
    assert account.secret_source == f"file {tmp_path / 'f.secret'}"


def test_relative_secret_file_resolves_beside_the_config(tmp_path: Path) -> None:
    """Without $CREDENTIALS_DIRECTORY a relative secret file is read beside the config file."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.secret").write_text("beside")
    path = write_config(tmp_path, doc({**FILE_ACCOUNT, "client_secret_file": "sub/f.secret"}))
    assert load_config(path, environ={}).accounts[0].client_secret.reveal() == "beside"


def test_relative_secret_file_resolves_under_credentials_directory(tmp_path: Path) -> None:
    """With $CREDENTIALS_DIRECTORY set, a relative secret file is read from there instead."""
    (tmp_path / "f.secret").write_text("beside")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "f.secret").write_text("from-credentials")
    config = load_config(
        write_config(tmp_path, doc(FILE_ACCOUNT)), environ={"CREDENTIALS_DIRECTORY": str(creds)}
    )
    (account,) = config.accounts
    assert account.client_secret.reveal() == "from-credentials"
    assert account.secret_source == f"file {creds / 'f.secret'}"


def test_empty_credentials_directory_counts_as_unset(tmp_path: Path) -> None:
    """An empty $CREDENTIALS_DIRECTORY falls back to the config file's directory."""
    (tmp_path / "f.secret").write_text("beside")
    path = write_config(tmp_path, doc(FILE_ACCOUNT))
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": ""})
    assert config.accounts[0].client_secret.reveal() == "beside"


def test_absolute_secret_file_ignores_credentials_directory(tmp_path: Path) -> None:
    """An absolute secret file path is read as given."""
    (tmp_path / "abs.secret").write_text("absolute")
    account = {**FILE_ACCOUNT, "client_secret_file": str(tmp_path / "abs.secret")}
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path / "nowhere")}
    config = load_config(write_config(tmp_path, doc(account)), environ=environ)
    assert config.accounts[0].client_secret.reveal() == "absolute"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the secret from file {p} is empty"),
        (b"\n", "the secret from file {p} is empty"),
        (
            SECRET.encode() + b"\n\n",
            "the secret from file {p} holds more than one line (only one trailing newline is stripped)",
        ),
        (
            SECRET.encode() + b"\nsecond",
            "the secret from file {p} holds more than one line (only one trailing newline is stripped)",
        ),
        (b" " + SECRET.encode(), "the secret from file {p} has leading or trailing whitespace"),
        (SECRET.encode() + b"\xff", "{p} is not UTF-8 text"),
        (None, "cannot read {p}: No such file or directory"),
        ("dir", "cannot read {p}: Is a directory"),
    ],
)
def test_bad_secret_file_names_key_path_and_file_never_content(
    tmp_path: Path, content: bytes | str | None, problem: str
) -> None:
    """A missing, unreadable, empty or multi-line secret file is an error naming key and file."""
    secret_path = tmp_path / "f.secret"
    if content == "dir":
        secret_path.mkdir()
    elif isinstance(content, bytes):
        secret_path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, doc(MAIN, FILE_ACCOUNT)), environ=ENV)
    assert info.value.key_path == "accounts[1].client_secret_file"
    assert info.value.problem == problem.format(p=secret_path)
    assert SECRET not in everything_printed(info.value)


def test_empty_secret_file_path_is_an_error() -> None:
    """client_secret_file must name a file."""
    exc = error_of(doc({**FILE_ACCOUNT, "client_secret_file": ""}))
    assert (exc.key_path, exc.problem) == (
        "accounts[0].client_secret_file",
        "must be a file path, got an empty string",
    )


def secret_file(directory: Path, mode: int, content: str = "file-SECRET-value") -> Path:
    """A secret file with ``mode``, whatever the umask."""
    path = directory / "f.secret"
    path.write_text(content + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o444, 0o664])
def test_secret_file_readable_by_others_loads_with_a_warning(tmp_path: Path, mode: int) -> None:
    """A secret file that group or others can read still loads, with a warning naming path and mode."""
    path = secret_file(tmp_path, mode)
    config = load_config(write_config(tmp_path, doc(MAIN, FILE_ACCOUNT)), environ=ENV)
    assert config.accounts[1].client_secret.reveal() == "file-SECRET-value"
    assert config.warnings == (
        ConfigWarning(
            event="config.secret_file_readable",
            key_path="accounts[1].client_secret_file",
            detail=f"{path} is mode {mode:04o}; chmod 600 it",
        ),
    )
    assert SECRET_FILE_READABLE == "config.secret_file_readable"


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o620, 0o602])
def test_secret_file_private_to_its_owner_loads_without_warning(tmp_path: Path, mode: int) -> None:
    """Mode 0600 or stricter (write bits aside) gives no warning; nor do env and inline secrets."""
    secret_file(tmp_path, mode)
    inline = {**MAIN, "name": "lit", "client_secret": "lit-SECRET"}
    config = load_config(
        write_config(tmp_path, doc(MAIN, HEDGE, inline, FILE_ACCOUNT)), environ=ENV
    )
    assert config.warnings == ()


@pytest.mark.parametrize("how", ["relative", "absolute", "dotted"])
def test_secret_file_under_credentials_directory_never_warns(tmp_path: Path, how: str) -> None:
    """Files systemd hands over in $CREDENTIALS_DIRECTORY are exempt, however they are named."""
    creds = tmp_path / "creds"
    creds.mkdir()
    path = secret_file(creds, 0o644)
    name = {"relative": "f.secret", "absolute": str(path), "dotted": "../creds/./f.secret"}[how]
    account = {**FILE_ACCOUNT, "client_secret_file": name}
    config = load_config(
        write_config(tmp_path, doc(account)), environ={"CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert config.accounts[0].client_secret.reveal() == "file-SECRET-value"
    assert config.warnings == ()


def test_secret_file_leaving_credentials_directory_is_checked(tmp_path: Path) -> None:
    """A path that resolves outside $CREDENTIALS_DIRECTORY (here through ..) is checked as usual."""
    creds = tmp_path / "creds"
    creds.mkdir()
    secret_file(tmp_path, 0o644)
    account = {**FILE_ACCOUNT, "client_secret_file": "../f.secret"}
    config = load_config(
        write_config(tmp_path, doc(account)), environ={"CREDENTIALS_DIRECTORY": str(creds)}
    )
    (warning,) = config.warnings
    assert warning.detail == f"{creds / '../f.secret'} is mode 0644; chmod 600 it"


def test_secret_file_warning_never_contains_the_secret(tmp_path: Path) -> None:
    """The warning and everything that shows the config name the file, never its content."""
    secret_file(tmp_path, 0o644, content="file-SECRET-value")
    config = load_config(write_config(tmp_path, doc(FILE_ACCOUNT)), environ=ENV)
    (warning,) = config.warnings
    shown = repr(config) + str(config.warnings) + warning.detail + "\n".join(describe(config))
    assert "file-SECRET-value" not in shown and "f.secret" in warning.detail


def test_config_equality_ignores_warnings(tmp_path: Path) -> None:
    """A chmod alone changes the warnings but not the config, so a reload sees no change."""
    path = secret_file(tmp_path, 0o644)
    config_path = write_config(tmp_path, doc(FILE_ACCOUNT))
    loose = load_config(config_path, environ=ENV)
    path.chmod(0o600)
    tight = load_config(config_path, environ=ENV)
    assert (len(loose.warnings), len(tight.warnings)) == (1, 0)
    assert loose == tight and hash(loose) == hash(tight)


# ---- http ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        ("[::1]:9464", "::1", 9464),
        ("0.0.0.0:9464", "0.0.0.0", 9464),
        ("[::]:9464", "::", 9464),
        ("localhost:9464", "localhost", 9464),
        ("keeper.trading.svc.cluster.local:9464", "keeper.trading.svc.cluster.local", 9464),
        ("10.1.2.3:80", "10.1.2.3", 80),
        ("9464", "127.0.0.1", 9464),
        (":9464", "127.0.0.1", 9464),
        (9464, "127.0.0.1", 9464),
        (0, "127.0.0.1", 0),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
    ],
)
def test_http_listen_accepts_each_documented_form(listen: object, host: str, port: int) -> None:
    """HOST:PORT, [IPv6]:PORT, :PORT and a bare port (integer or digits; on loopback) all load."""
    assert load(doc(http={"listen": listen})).http == HttpConfig(host=host, port=port)


def test_no_http_section_means_no_endpoint() -> None:
    """Without an http section, or with its lines all commented out, nothing listens."""
    assert load(doc()).http is None
    assert load("http:\n  # listen: 127.0.0.1:9464\n" + doc()).http is None


@pytest.mark.parametrize(
    ("http", "bind"),
    [
        (HttpConfig("127.0.0.1", 9464), "127.0.0.1:9464"),
        (HttpConfig("::1", 9464), "[::1]:9464"),
        (HttpConfig("localhost", 0), "localhost:0"),
    ],
)
def test_http_bind_puts_ipv6_hosts_in_brackets(http: HttpConfig, bind: str) -> None:
    """bind is HOST:PORT as hypercorn takes it, with an IPv6 host in brackets."""
    assert http.bind == bind


@pytest.mark.parametrize(
    ("listen", "line"),
    [
        ("127.0.0.1:9464", "http: listen 127.0.0.1:9464 (loopback only)"),
        ("9464", "http: listen 127.0.0.1:9464 (loopback only)"),
        ("[::1]:9464", "http: listen [::1]:9464 (loopback only)"),
        ("localhost:9464", "http: listen localhost:9464 (loopback only)"),
        ("0.0.0.0:9464", "http: listen 0.0.0.0:9464 (every interface)"),
        ("[::]:9464", "http: listen [::]:9464 (every interface)"),
        ("10.1.2.3:9464", "http: listen 10.1.2.3:9464 (reachable from other hosts)"),
    ],
)
def test_describe_shows_the_http_endpoint(listen: str, line: str) -> None:
    """describe() shows where the endpoint listens and who can reach it, after the log line."""
    assert describe(load(doc(http={"listen": listen})))[2] == line


def test_keeper_config_still_builds_from_its_first_three_fields() -> None:
    """http and warnings default to off and none, so older callers need not name them."""
    config = KeeperConfig(source=Path("x.yaml"), log=LogConfig(), accounts=())
    assert (config.http, config.warnings) == (None, ())
    assert describe(config)[2] == "http: off"


# ---- the file itself --------------------------------------------------------------------------


def test_load_config_names_the_path_as_given_and_stores_it_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors name the path the operator typed; source is absolute so a reload survives chdir."""
    write_config(tmp_path, doc(MAIN, {**HEDGE, "heartbeat_interval": 5}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("config.yaml", environ=ENV)
    assert str(info.value) == "config.yaml: accounts[1].heartbeat_interval: must be >= 10, got 5"
    write_config(tmp_path, doc())
    assert load_config("config.yaml", environ=ENV).source == tmp_path / "config.yaml"


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("missing", "file not found"),
        ("dir", "cannot read: Is a directory"),
        ("latin1", "is not UTF-8 text"),
    ],
)
def test_unreadable_config_file_is_a_config_error(tmp_path: Path, setup: str, problem: str) -> None:
    """A missing, unreadable or non-UTF-8 config file is a ConfigError naming the file."""
    path = tmp_path / "config.yaml"
    if setup == "dir":
        path.mkdir()
    elif setup == "latin1":
        path.write_bytes(b"log: {level: \xe9}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key_path, info.value.problem) == (str(path), "", problem)
    assert str(info.value) == f"{path}: {problem}"


def test_default_config_path_prefers_the_environment() -> None:
    """$DERIBIT_KEEPER_CONFIG wins when set and non-empty; otherwise /etc/deribit-keeper."""
    assert default_config_path({"DERIBIT_KEEPER_CONFIG": "/srv/k.yaml"}) == Path("/srv/k.yaml")
    assert default_config_path({"DERIBIT_KEEPER_CONFIG": ""}) == Path(
        "/etc/deribit-keeper/config.yaml"
    )
    assert default_config_path({}) == Path("/etc/deribit-keeper/config.yaml")


# ---- Secret -----------------------------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    """repr, str, format, f-strings and %-formatting all hide the value."""
    secret = Secret(SECRET)
    assert repr(secret) == "Secret('***')"
    assert str(secret) == "***"
    assert format(secret) == "***"
    assert f"{secret}" == "***" and f"{secret!r}" == "Secret('***')" and f"{secret!s}" == "***"
    assert f"{secret:>5}" == "  ***"
    assert "%s %r" % (secret, secret) == "*** Secret('***')"  # noqa: UP031 - %-format is the point
    assert repr([secret]) == "[Secret('***')]"
    assert secret.reveal() == SECRET


def test_secret_compares_and_hashes_by_value() -> None:
    """Two secrets are equal exactly when their values are, so a reload can spot a change."""
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert hash(Secret("a")) == hash(Secret("a"))
    assert Secret("a") != "a"
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2
    assert Secret("ünïcode") == Secret("ünïcode")


def test_secret_is_immutable_slotted_and_refuses_pickling() -> None:
    """A Secret cannot be changed, has no __dict__, and is never pickled; copies are itself."""
    secret = Secret(SECRET)
    with pytest.raises(AttributeError):
        secret._value = "other"
    with pytest.raises(AttributeError):
        del secret._value
    assert not hasattr(secret, "__dict__")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(secret, protocol=protocol)
    assert copy.copy(secret) is secret and copy.deepcopy(secret) is secret


def test_account_equality_follows_the_secret_value() -> None:
    """Accounts differing only in their secret are unequal; where it came from does not matter."""
    (env_account,) = load(doc()).accounts
    (inline_account,) = load(doc({**MAIN, "client_secret": SECRET})).accounts
    (other,) = load(doc({**MAIN, "client_secret": "other-Secret"})).accounts
    assert (
        env_account == inline_account and env_account.secret_source != inline_account.secret_source
    )
    assert env_account != other


def test_config_is_frozen() -> None:
    """The config is immutable once loaded."""
    config = load(doc())
    with pytest.raises(AttributeError):
        config.accounts[0].heartbeat_interval = 1  # type: ignore[misc]


# ---- no secret in any output -------------------------------------------------------------------

LEAKY_CASES = [
    doc({**MAIN, "client_secret": 12345678901234}),
    doc({**MAIN, "client_secret": [SECRET]}),
    doc({**MAIN, "client_secret": {SECRET: SECRET}}),
    doc({**MAIN, "client_secret": SECRET + " "}),
    doc({**MAIN, "client_secret": SECRET + "\nline"}),
    doc({**MAIN, "client_secret": SECRET + "${NOPE}"}),
    doc({**MAIN, "client_secret": SECRET + "${"}),
    doc({**MAIN, "client_secret": SECRET, "client_secret_env": "X"}),
    doc({**MAIN, "client_secret": SECRET, "heartbeat_interval": 1}),
    doc({**MAIN, "client_secret": SECRET, "client_secret_intervall": 1}),
    doc(defaults={"environment": "test", "client_secret": SECRET}),
    doc({**MAIN, "client_secret": "${MAIN_SECRET}", "url": "ws://example.com"}),
    doc({**MAIN, "url": f"wss://main:{SECRET}@test.deribit.com/ws"}),
    doc({**MAIN, "url": f"ws://example.com/?key={SECRET}"}),
    f"accounts:\n  - name: main\n    client_secret:{SECRET}\n    client_id: x\n",
    f"accounts:\n  - {{name: main, client_secret: *{SECRET}}}\n",
    f'accounts:\n  - {{name: main, client_secret: "{SECRET}\\q"}}\n',
    f"accounts:\n  - {{name: main, client_secret: !{SECRET} x}}\n",
    f"accounts:\n  - {{name: main, client_secret: [{SECRET}\n",
    f"accounts:\n  - {{name: main, client_secret: '{SECRET}\n",
    f"accounts:\n  - name: main\n    client_secret: {SECRET}\n    client_secret: {SECRET}\n",
]


@pytest.mark.parametrize("text", LEAKY_CASES)
def test_no_config_error_ever_contains_a_secret(text: str) -> None:
    """Whatever is wrong, neither the message nor any chained exception quotes a secret."""
    exc = error_of(text)
    printed = everything_printed(exc)
    assert SECRET not in printed
    assert "12345678901234" not in printed


def test_repr_and_describe_never_contain_a_secret(tmp_path: Path) -> None:
    """repr(KeeperConfig) and describe() show where secrets come from, never their values."""
    (tmp_path / "f.secret").write_text("file-SECRET-value\n")
    accounts = [MAIN, HEDGE, FILE_ACCOUNT, {**MAIN, "name": "lit", "client_secret": "lit-SECRET"}]
    config = load_config(write_config(tmp_path, doc(*accounts)), environ=ENV)
    shown = repr(config) + str(config) + "\n".join(describe(config))
    for secret in (SECRET, "file-SECRET-value", "lit-SECRET"):
        assert secret not in shown
    lines = describe(config)
    assert "  secret: env MAIN_SECRET" in lines
    assert f"  secret: file {tmp_path / 'f.secret'}" in lines
    assert "  secret: inline" in lines


def test_describe_summarises_each_account() -> None:
    """describe() lists every account with endpoint, auth, COD scope, heartbeat and shutdown."""
    text = doc(MAIN, {**HEDGE, "auth": "credentials", "on_shutdown": "logout"})
    lines = describe(load(text))
    assert lines[:4] == [
        "config: config.yaml",
        "log: level info, format json",
        "http: off",
        "accounts: 2",
    ]
    hedge = lines[lines.index("account hedge:") :]
    assert hedge == [
        "account hedge:",
        f"  endpoint: {TEST_URL} (test)",
        "  client_id: XyZ98765",
        "  secret: env MAIN_SECRET",
        "  auth: credentials (client_credentials, the secret is sent to Deribit)",
        "  cancel_on_disconnect: connection (COD on for the keeper's connection)",
        "  heartbeat: every 10s; request timeout 5s",
        "  backoff: 0.5s doubling to 30s",
        "  on_shutdown: logout (private/logout first, Cancel-On-Disconnect does not fire)",
        "  on_start: keep (orders left by an earlier run stay)",
        "  cod check: every 60s",
        "  gateway: off",
    ]


# ---- the shipped files -------------------------------------------------------------------------


@pytest.mark.parametrize("credentials_directory", [False, True])
def test_example_yaml_loads(tmp_path: Path, credentials_directory: bool) -> None:
    """config/example.yaml loads with its env var set and its secret file present."""
    path = tmp_path / "example.yaml"
    shutil.copy(CONFIG_DIR / "example.yaml", path)
    environ = {"DERIBIT_MAIN_SECRET": "main-from-env"}
    secret_dir = tmp_path
    if credentials_directory:
        secret_dir = tmp_path / "creds"
        secret_dir.mkdir()
        environ["CREDENTIALS_DIRECTORY"] = str(secret_dir)
    (secret_dir / "hedge.secret").write_text("hedge-from-file\n")
    config = load_config(path, environ=environ)
    main, hedge = config.accounts
    assert (main.name, main.url, main.client_secret.reveal()) == ("main", TEST_URL, "main-from-env")
    assert (hedge.name, hedge.client_secret.reveal()) == ("hedge", "hedge-from-file")
    assert hedge.secret_source == f"file {secret_dir / 'hedge.secret'}"
    assert config.log == LogConfig(level="info", format="json")


def test_example_yaml_documents_every_key() -> None:
    """Every key the loader knows appears in example.yaml, so operators can read about it."""
    text = (CONFIG_DIR / "example.yaml").read_text()
    keys = ["log:", "level:", "format:", "defaults:", "environment:", "url:", "auth:"]
    keys += ["heartbeat_interval:", "cancel_on_disconnect:", "on_shutdown:", "request_timeout:"]
    keys += ["backoff:", "initial:", "max:", "accounts:", "name:", "client_id:"]
    keys += ["client_secret:", "client_secret_file:", "client_secret_env:", "CREDENTIALS_DIRECTORY"]
    keys += ["http:", "listen:", "0.0.0.0", "config.secret_file_readable"]
    keys += ["gateway:", "clients:", "max_clients:", "auth: none"]
    assert [key for key in keys if key not in text] == []
    assert "# url: ws://127.0.0.1:8765/ws/api/v2" in text
    assert "\n# http: {listen: 127.0.0.1:9464}\n" in text


def test_example_yaml_commented_lines_load_when_uncommented(tmp_path: Path) -> None:
    """Uncommenting the example's http line and spare account gives what the comments promise."""
    text = (CONFIG_DIR / "example.yaml").read_text()
    text = text.replace("\n# http: {listen", "\nhttp: {listen")
    for line in ("- name: spare", "  client_id: Qw12Er34", "  client_secret_env: DERIBIT_"):
        text = text.replace(f"  # {line}", f"  {line}")
    (tmp_path / "hedge.secret").write_text("hedge-from-file\n")
    environ = {"DERIBIT_MAIN_SECRET": "m", "DERIBIT_SPARE_SECRET": "spare-from-env"}
    config = parse_config(text, source=tmp_path / "example.yaml", environ=environ)
    assert config.http == HttpConfig(host="127.0.0.1", port=9464)
    spare = config.accounts[2]
    assert (spare.name, spare.client_secret.reveal(), spare.secret_source) == (
        "spare",
        "spare-from-env",
        "env DERIBIT_SPARE_SECRET",
    )


def test_demo_yaml_loads() -> None:
    """config/demo.yaml loads as shipped: three loopback accounts with demo-only secrets."""
    config = load_config(CONFIG_DIR / "demo.yaml", environ={})
    assert config.log == LogConfig(level="debug", format="console")
    alpha, beta, gamma = config.accounts
    assert [a.name for a in config.accounts] == ["alpha", "beta", "gamma"]
    for account in config.accounts:
        assert (account.url, account.environment) == ("ws://127.0.0.1:0/ws/api/v2", None)
        assert account.backoff == BackoffConfig(initial=0.5, max=8.0)
        assert (account.heartbeat_interval, account.request_timeout) == (10.0, 5.0)
    assert (alpha.cancel_on_disconnect, alpha.auth, alpha.on_shutdown) == (
        "connection",
        "signature",
        "close",
    )
    assert beta.cancel_on_disconnect == "account"
    assert (gamma.auth, gamma.on_shutdown) == ("credentials", "logout")


# ---- properties ---------------------------------------------------------------------------------

_JUNK_TEXT = st.text(string.ascii_lowercase + string.digits + "_.:/${} \n\t", max_size=12)
_SCALARS = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | _JUNK_TEXT
_KNOWN_KEYS = [
    "log",
    "defaults",
    "accounts",
    "level",
    "format",
    "environment",
    "url",
    "auth",
    "heartbeat_interval",
    "cancel_on_disconnect",
    "on_shutdown",
    "request_timeout",
    "backoff",
    "initial",
    "max",
    "name",
    "client_id",
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "http",
    "listen",
    "gateway",
    "clients",
    "max_clients",
]
_KEYS = st.sampled_from(_KNOWN_KEYS) | _JUNK_TEXT
_JUNK = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(deadline=None)
@given(document=st.dictionaries(_KEYS, _JUNK, max_size=4))
def test_any_yaml_mapping_loads_or_raises_config_error(document: dict[str, Any]) -> None:
    """Arbitrary junk mappings either load or raise ConfigError, never anything else."""
    try:
        load(yaml.safe_dump(document), environ={"X": "x"})
    except ConfigError:
        pass


@settings(deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_loads_or_raises_config_error(text: str) -> None:
    """Arbitrary text either loads or raises ConfigError, never anything else."""
    try:
        load(text)
    except ConfigError:
        pass


@settings(deadline=None)
@given(listen=_SCALARS | st.text(string.printable, max_size=24) | st.integers(-5, 70000))
def test_any_listen_value_loads_or_names_http_listen(listen: object) -> None:
    """Any http.listen value either gives a host and a port in range or an error naming it."""
    try:
        http = load(doc(http={"listen": listen})).http
    except ConfigError as exc:
        assert exc.key_path == "http.listen"
    else:
        assert http is not None and http.host and 0 <= http.port <= 65535


@settings(deadline=None)
@given(
    secret=st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=16).map(
        lambda s: f"SECRET-{s}"
    ),
    account=st.dictionaries(_KEYS, _JUNK, max_size=4),
    key=st.sampled_from(["client_secret", "url"]),
)
def test_a_secret_among_junk_never_reaches_a_message(
    secret: str, account: dict[str, Any], key: str
) -> None:
    """A secret placed among arbitrary other keys never appears in the resulting error."""
    text = doc({**account, key: secret, "client_secret": secret})
    try:
        config = load(text, environ={})
    except ConfigError as exc:
        assert secret not in everything_printed(exc)
    else:
        assert secret not in repr(config) + "\n".join(describe(config))
