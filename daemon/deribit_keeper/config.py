"""The keeper's configuration: one YAML file becomes frozen dataclasses, validated once at start.

Why it looks like this:

* **Pure.** Nothing here touches the network or Trio; the only I/O is reading the config file and
  the secret files it names. A reload calls ``load_config`` again and the supervisor compares the
  new ``AccountConfig`` values with the running ones (they compare by value, secrets included;
  an account's ``gateway`` is compared on its own, so that a changed gateway keeps the session).
* **One strict loader.** Every problem raises ``ConfigError`` with the message
  ``"<file>: <key path>: <problem>"``, e.g. ``config.yaml: accounts[1].heartbeat_interval: must be
  >= 10, got 5``. A value inherited from ``defaults`` is blamed where it was written
  (``defaults.heartbeat_interval``), not on every account that inherits it.
* **Nothing silently dropped.** Unknown and duplicate keys, wrong types (a bool is not a number, a
  number is not a string) and out-of-range values are errors, never ignored or coerced, unlike
  hypercorn's ``Config.from_mapping``.
* **Secrets are a type.** ``Secret`` never shows its value; errors about a secret name its key, its
  type or where it came from, never its text, and YAML syntax errors drop quoted fragments because
  PyYAML would quote the offending line.
* **Warnings ride along.** What loads but is unwise (a secret file that group or others can read,
  outside ``$CREDENTIALS_DIRECTORY``) is a ``ConfigWarning`` in ``KeeperConfig.warnings``; nothing
  here logs, the caller does, at startup and on every reload.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, NoReturn, SupportsIndex, get_args

from ._config_gateway import GatewayChecker, describe_gateway
from ._config_validate import SECRET_FILE_READABLE as SECRET_FILE_READABLE
from ._config_validate import SECRET_KEYS, Raw, bind_address, reach, type_name
from ._config_validate import ConfigWarning as ConfigWarning
from .errors import ConfigError
from .protocol import ENVIRONMENT_URLS, HEARTBEAT_MIN_S

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]
Environment = Literal["test", "prod"]
AuthMethod = Literal["signature", "credentials"]  # public/auth grant_type client_<method>
CodScope = Literal["connection", "account"]  # scope of private/enable_cancel_on_disconnect
ShutdownMode = Literal["close", "logout"]
StartMode = Literal["keep", "cancel_all"]  # what on_start does to orders left by an earlier run
GatewayAuth = Literal["clients", "none"]  # "none" is written `auth: none`; "clients" is its absence

DEFAULT_CONFIG_PATH: Final = Path("/etc/deribit-keeper/config.yaml")
CONFIG_PATH_VAR: Final = "DERIBIT_KEEPER_CONFIG"
HEARTBEAT_MAX_S: Final = 3600.0  # an hour of silence before noticing a dead link defeats the point
REQUEST_TIMEOUT_MAX_S: Final = 300.0  # no single Deribit request legitimately takes 5 minutes
COD_CHECK_MIN_S: Final = 5.0  # re-reading the COD setting more often would only spend rate limit
COD_CHECK_MAX_S: Final = 3600.0
BACKOFF_MAX_S: Final = 3600.0  # a keeper that waits longer than an hour to retry is not keeping
NAME_MAX_LEN: Final = 64  # account names go into every log line and metric label


class Secret:
    """A string that never shows itself: ``repr`` is ``Secret('***')``, ``str`` is ``***``.

    ``format`` and f-strings give ``***`` too. ``reveal()`` is the only way to read the value, so
    every use can be found with grep. Secrets compare by value (in constant time), so a reload can
    tell whether an account's secret changed. Instances are immutable; pickling is refused rather
    than writing the value out, and copies are the same object.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The secret itself; call it only where the value goes to Deribit or into an HMAC."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return format("***", spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("a Secret cannot be pickled: that would write its value out")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self


@dataclass(frozen=True, slots=True)
class LogConfig:
    """How the keeper logs: ``json`` lines for machines or ``console`` for people."""

    level: LogLevel = "info"
    format: LogFormat = "json"


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    """Reconnect delays in seconds: full jitter, starting at ``initial``, capped at ``max``."""

    initial: float = 0.5
    max: float = 30.0


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """One Deribit account the keeper holds a session for; times are in seconds.

    ``environment`` is None when ``url`` was given explicitly. ``secret_source`` says where the
    secret came from (``env VAR``, ``file /path``, ``inline``) for ``describe``; it takes no part
    in equality, so moving a secret from the environment to a file does not restart a session.
    ``gateway`` (None: no gateway) takes no part in equality either, because the supervisor
    compares gateways separately, so that a changed gateway block restarts the gateway but keeps
    the upstream session.
    """

    name: str
    client_id: str
    client_secret: Secret
    url: str
    environment: Environment | None
    auth: AuthMethod = "signature"
    heartbeat_interval: float = 10.0
    cancel_on_disconnect: CodScope = "connection"
    on_shutdown: ShutdownMode = "close"
    request_timeout: float = 5.0
    backoff: BackoffConfig = BackoffConfig()
    cod_check_interval: float = 60.0
    on_start: StartMode = "keep"
    secret_source: str = field(default="inline", compare=False)
    gateway: GatewayConfig | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class LocalClient:
    """One local credential a trading engine authenticates to the gateway with; never Deribit's."""

    client_id: str
    client_secret: Secret
    secret_source: str = field(default="inline", compare=False)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """An account's local endpoint, ``ws://HOST:PORT/ws/api/v2``, for trading engines.

    ``host`` is bare, as in ``HttpConfig``. ``clients`` is empty exactly when ``auth`` is
    ``"none"``, which the loader allows only on a loopback host. With ``cancel_on_disconnect``
    every local link starts with local COD on; ``max_clients`` links may be open at once.
    """

    host: str
    port: int
    clients: tuple[LocalClient, ...] = ()
    auth: GatewayAuth = "clients"
    cancel_on_disconnect: bool = False
    max_clients: int = 64

    @property
    def bind(self) -> str:
        return bind_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Where the health, status and metrics endpoint listens; port 0 picks any free port.

    ``host`` is bare (``::1``, not ``[::1]``), as ``socket.bind`` takes it; ``bind`` is the
    ``HOST:PORT`` form, brackets included, as hypercorn's ``Config.bind`` takes it.
    ``admin_token`` (from ``admin_token_file``) unlocks the routes that act, such as
    ``POST /accounts/NAME/cancel-all``; without it they are refused.
    """

    host: str
    port: int
    admin_token: Secret | None = None
    admin_token_source: str = field(default="", compare=False)

    @property
    def bind(self) -> str:
        return bind_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class KeeperConfig:
    """The whole configuration; ``source`` is the file it came from, read again on reload.

    ``http`` is None without an ``http`` section: no endpoint is served. ``warnings`` are for the
    caller to log; they take no part in equality, so a chmod alone does not count as a change.
    """

    source: Path
    log: LogConfig
    accounts: tuple[AccountConfig, ...]
    http: HttpConfig | None = None
    warnings: tuple[ConfigWarning, ...] = field(default=(), compare=False)


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$DERIBIT_KEEPER_CONFIG`` if set and non-empty, else ``/etc/deribit-keeper/config.yaml``."""
    value = (os.environ if environ is None else environ).get(CONFIG_PATH_VAR)
    return Path(value) if value else DEFAULT_CONFIG_PATH


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> KeeperConfig:
    """Read and validate the config file; errors name ``path`` as given, ``source`` is absolute.

    Raises:
        ConfigError: the file is missing or unreadable, or anything in it is wrong.
    """
    display = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = "file not found"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as exc:
        problem = f"cannot read: {exc.strerror or type(exc).__name__}"
    else:
        return _Loader(display, Path(path).absolute(), environ).config(text)
    raise ConfigError(display, "", problem)


def load_http_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> HttpConfig | None:
    """Only the ``http`` section of the config file, checked as ``load_config`` checks it.

    For ``deribit-keeper cancel-all``, which talks to the running keeper's endpoint and never
    to Deribit: it must run from an operator's shell, where the service's secrets (its
    ``${VAR}``s, its ``$CREDENTIALS_DIRECTORY``) are not there to resolve.

    Raises:
        ConfigError: the file is missing or unreadable, or its ``http`` section is wrong.
    """
    display = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            display, "", f"cannot read: {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(display, "", "is not UTF-8 text") from None
    return _Loader(display, Path(path).absolute(), environ).http_section(text)


def parse_config(
    text: str, *, source: Path, environ: Mapping[str, str] | None = None
) -> KeeperConfig:
    """Validate YAML ``text`` as if read from ``source``, beside which secret files resolve."""
    return _Loader(str(source), source, environ).config(text)


_AUTH_NOTES: Final = {
    "signature": "client_signature, the secret never leaves this host",
    "credentials": "client_credentials, the secret is sent to Deribit",
}
_COD_NOTES: Final = {
    "connection": "on for the keeper's connection",
    "account": "on for the keeper's connection and every connection the account opens later",
}
_SHUTDOWN_NOTES: Final = {
    "close": "drop the link, Cancel-On-Disconnect fires",
    "logout": "private/logout first, Cancel-On-Disconnect does not fire",
}


_START_NOTES: Final = {
    "keep": "orders left by an earlier run stay",
    "cancel_all": "private/cancel_all on the first ready session after the keeper starts",
}


def _describe_http(http: HttpConfig | None) -> str:
    if http is None:
        return "http: off"
    admin = f"; admin token from {http.admin_token_source}" if http.admin_token else ""
    return f"http: listen {http.bind} ({reach(http.host)}){admin}"


def describe(config: KeeperConfig) -> list[str]:
    """Lines for ``deribit-keeper check``: what would run, and where each secret comes from."""
    lines = [
        f"config: {config.source}",
        f"log: level {config.log.level}, format {config.log.format}",
        _describe_http(config.http),
        f"accounts: {len(config.accounts)}",
    ]
    for a in config.accounts:
        cod = a.cancel_on_disconnect
        lines += [
            f"account {a.name}:",
            f"  endpoint: {a.url} ({a.environment or 'explicit url'})",
            f"  client_id: {a.client_id}",
            f"  secret: {a.secret_source}",
            f"  auth: {a.auth} ({_AUTH_NOTES[a.auth]})",
            f"  cancel_on_disconnect: {cod} (COD {_COD_NOTES[cod]})",
            f"  heartbeat: every {a.heartbeat_interval:g}s; request timeout {a.request_timeout:g}s",
            f"  backoff: {a.backoff.initial:g}s doubling to {a.backoff.max:g}s",
            f"  on_shutdown: {a.on_shutdown} ({_SHUTDOWN_NOTES[a.on_shutdown]})",
            f"  on_start: {a.on_start} ({_START_NOTES[a.on_start]})",
            f"  cod check: every {a.cod_check_interval:g}s",
            f"  gateway: {describe_gateway(a.gateway)}",
        ]
    return lines


# ---- the loader ------------------------------------------------------------------------------

_TOP_KEYS: Final = ("log", "http", "defaults", "accounts")
_LOG_KEYS: Final = ("level", "format")
_HTTP_KEYS: Final = ("listen", "admin_token_file")
_BACKOFF_KEYS: Final = ("initial", "max")
# What an account must set itself, never inherit, and why; all but `gateway` identify it.
_OWN_KEYS: Final = {
    **dict.fromkeys(("name", "client_id"), "it names one account"),
    **dict.fromkeys(SECRET_KEYS, "give each account its own"),
    "gateway": "every gateway needs its own port",
}
_SHARED_KEYS: Final = (
    *("environment", "url", "auth", "heartbeat_interval", "cancel_on_disconnect"),
    *("on_shutdown", "request_timeout", "backoff", "cod_check_interval", "on_start"),
)
_ENDPOINT_KEYS: Final = frozenset({"url", "environment"})
_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")
# Slotted dataclasses keep no defaults on the class, so read them from an instance or the fields.
_LOG: Final = LogConfig()
_BACKOFF: Final = BackoffConfig()
_DEFAULTS: Final[dict[str, Any]] = {f.name: f.default for f in dataclasses.fields(AccountConfig)}


class _Settings(NamedTuple):
    """The checked keys an account may inherit from ``defaults``; named like AccountConfig's."""

    url: str
    environment: Environment | None
    auth: AuthMethod
    heartbeat_interval: float
    cancel_on_disconnect: CodScope
    on_shutdown: ShutdownMode
    request_timeout: float
    backoff: BackoffConfig
    cod_check_interval: float
    on_start: StartMode


class _Loader(GatewayChecker):
    """One validation pass over one document: sections, defaults, accounts and their merge."""

    def config(self, text: str) -> KeeperConfig:
        document = self.parse_yaml(text)
        if document is None:
            raise self.error("", "the file is empty; expected a mapping with an accounts list")
        top = self.mapping(Raw(document, ""), _TOP_KEYS)
        log = self.mapping(top.get("log", Raw(None, "log")), _LOG_KEYS, null_ok=True)
        http = self.mapping(top.get("http", Raw(None, "http")), _HTTP_KEYS, null_ok=True)
        defaults = self.defaults(top.get("defaults", Raw(None, "defaults")))
        if "accounts" not in top:
            raise self.error("accounts", "missing: list at least one account")
        items = top["accounts"].value
        if items is None or items == []:
            raise self.error("accounts", "must list at least one account")
        if not isinstance(items, list):
            raise self.error("accounts", f"must be a list of accounts, got {type_name(items)}")
        accounts = [self.account(Raw(v, f"accounts[{i}]"), defaults) for i, v in enumerate(items)]
        first: dict[str, int] = {}
        for i, account in enumerate(accounts):
            if account.name in first:
                where = f"accounts[{first[account.name]}].name"
                raise self.error(f"accounts[{i}].name", f"{account.name!r} is already {where}")
            first[account.name] = i
        # No section, or one with every line commented out: no endpoint, as for log below.
        endpoint = self.http(http)
        self.unique_listens(accounts, endpoint)
        return KeeperConfig(
            source=self.source,
            log=LogConfig(
                level=self.choice(log.get("level"), get_args(LogLevel), _LOG.level),
                format=self.choice(log.get("format"), get_args(LogFormat), _LOG.format),
            ),
            accounts=tuple(accounts),
            http=endpoint,
            warnings=tuple(self.warnings),
        )

    def http_section(self, text: str) -> HttpConfig | None:
        """The ``http`` section alone; the rest of the document is not looked at."""
        document = self.parse_yaml(text)
        if not isinstance(document, dict):
            raise self.error("", "expected a mapping with an accounts list")
        http = self.mapping(Raw(document.get("http"), "http"), _HTTP_KEYS, null_ok=True)
        return self.http(http)

    def http(self, http: dict[str, Raw]) -> HttpConfig | None:
        """The endpoint, or None without ``listen`` (no section, or every line commented out)."""
        if "listen" not in http:
            if "admin_token_file" in http:
                raise self.error("http.admin_token_file", "needs http.listen: nothing serves it")
            return None
        host, port = self.listen(http["listen"])
        if "admin_token_file" not in http:
            return HttpConfig(host, port)
        raw = http["admin_token_file"]
        path = self.secret_path(raw)
        token = self.read_secret(raw, path)
        if not token or token != token.strip() or "\n" in token or "\r" in token:
            raise self.error(raw.path, f"the token in {path} must be one non-empty line")
        return HttpConfig(host, port, Secret(token), f"file {path}")

    def defaults(self, raw: Raw) -> dict[str, Raw]:
        """The flattened ``defaults``; each value is checked even if every account overrides it."""
        entries = self.mapping(raw, (*_SHARED_KEYS, *_OWN_KEYS), null_ok=True)
        for key, why in _OWN_KEYS.items():
            if key in entries:
                raise self.error(entries[key].path, f"may not be set in defaults; {why}")
        fields = self.flatten(entries)
        self.settings(fields, account_path=None)
        return fields

    def flatten(self, entries: dict[str, Raw]) -> dict[str, Raw]:
        """``backoff: {initial, max}`` becomes ``backoff.initial`` and ``backoff.max`` entries,
        so that a plain dict merge overrides the defaults' backoff key by key."""
        fields = {k: v for k, v in entries.items() if k != "backoff"}
        if "backoff" in entries:
            for key, raw in self.mapping(entries["backoff"], _BACKOFF_KEYS, null_ok=True).items():
                fields[f"backoff.{key}"] = raw
        return fields

    def account(self, raw: Raw, defaults: dict[str, Raw]) -> AccountConfig:
        own = self.mapping(raw, (*_OWN_KEYS, *_SHARED_KEYS))
        for key in ("name", "client_id"):
            if key not in own:
                raise self.error(f"{raw.path}.{key}", "required key is missing")
        name = self.string(own["name"])
        if not _NAME.fullmatch(name) or len(name) > NAME_MAX_LEN:
            why = f"must be 1 to {NAME_MAX_LEN} characters from A-Z a-z 0-9 _ . -"
            raise self.error(own["name"].path, f"{why}, got {name!r}")
        client_id = self.client_id(own["client_id"])
        secret, secret_source = self.secret(own, raw.path)  # before the merge: never in defaults
        if own.keys() & _ENDPOINT_KEYS:  # the account picks its endpoint: inherit neither key
            defaults = {k: v for k, v in defaults.items() if k not in _ENDPOINT_KEYS}
        settings = self.settings({**defaults, **self.flatten(own)}, account_path=raw.path)
        return AccountConfig(
            name=name,
            client_id=client_id,
            client_secret=Secret(secret),
            secret_source=secret_source,
            **settings._asdict(),
            gateway=self.gateway(own.get("gateway"), deribit_secret=secret),
        )

    def settings(self, fields: dict[str, Raw], *, account_path: str | None) -> _Settings:
        """Check what an account may inherit; with no ``account_path`` (defaults alone) skip the
        checks that need the merged whole: an endpoint is set, backoff.max >= backoff.initial."""
        get = fields.get
        environment = self.choice(get("environment"), get_args(Environment), None)
        if "url" in fields:
            url, environment = self.url(fields["url"]), None
        elif environment is not None:
            url = ENVIRONMENT_URLS[environment]
        elif account_path is None:
            url = ""
        else:
            raise self.error(account_path, "no endpoint: set environment (test|prod) or url")
        return _Settings(
            url=url,
            environment=environment,
            auth=self.choice(get("auth"), get_args(AuthMethod), _DEFAULTS["auth"]),
            heartbeat_interval=self.seconds(
                get("heartbeat_interval"),
                _DEFAULTS["heartbeat_interval"],
                HEARTBEAT_MIN_S,
                HEARTBEAT_MAX_S,
                inclusive=True,
            ),
            cancel_on_disconnect=self.choice(
                get("cancel_on_disconnect"), get_args(CodScope), _DEFAULTS["cancel_on_disconnect"]
            ),
            on_shutdown=self.choice(
                get("on_shutdown"), get_args(ShutdownMode), _DEFAULTS["on_shutdown"]
            ),
            request_timeout=self.seconds(
                get("request_timeout"), _DEFAULTS["request_timeout"], 0, REQUEST_TIMEOUT_MAX_S
            ),
            backoff=self.backoff(fields, merged=account_path is not None),
            cod_check_interval=self.seconds(
                get("cod_check_interval"),
                _DEFAULTS["cod_check_interval"],
                COD_CHECK_MIN_S,
                COD_CHECK_MAX_S,
                inclusive=True,
            ),
            on_start=self.choice(get("on_start"), get_args(StartMode), _DEFAULTS["on_start"]),
        )

    def backoff(self, fields: dict[str, Raw], *, merged: bool) -> BackoffConfig:
        """Backoff from its two keys; once ``merged``, ``max`` must not be below ``initial``."""
        first, cap = fields.get("backoff.initial"), fields.get("backoff.max")
        initial = self.seconds(first, _BACKOFF.initial, 0, BACKOFF_MAX_S)
        most = self.seconds(cap, _BACKOFF.max, 0, BACKOFF_MAX_S)
        if merged:
            self.ordered((first, initial, "backoff.initial"), (cap, most, "backoff.max"))
        return BackoffConfig(initial=initial, max=most)
