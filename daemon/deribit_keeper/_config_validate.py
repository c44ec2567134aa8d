"""Checks for single config values, each raising ``ConfigError`` with the value's key path.

Private to ``config.py``, which owns the structure (sections, defaults, accounts); this module knows
only values: YAML text, mappings, strings, choices, seconds, URLs, listen addresses, ``${VAR}`` and
secret files. An error about a value that might be a secret names its key, its type or its origin,
never its text. What is allowed but unwise (a secret file others can read) becomes a
``ConfigWarning`` on ``Checker.warnings`` instead of an error.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError

CREDENTIALS_DIR_VAR: Final = "CREDENTIALS_DIRECTORY"  # set by systemd's LoadCredential=
SECRET_KEYS: Final = ("client_secret", "client_secret_file", "client_secret_env")
_ONE_OF: Final = ", ".join(SECRET_KEYS)
_VAR_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_VAR_REF: Final = re.compile(r"\$\{([^}]*)\}")
SECRET_FILE_READABLE: Final = "config.secret_file_readable"  # the event a ConfigWarning logs as
LOOPBACK_HOST: Final = "127.0.0.1"  # where a bare http.listen port listens: loopback by default
PORT_MAX: Final = 65535
_OTHERS_READ: Final = stat.S_IRGRP | stat.S_IROTH  # 0o044
_DIGITS: Final = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes "²" and "٣"
_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1123, no underscores
_LISTEN_FORMS: Final = "HOST:PORT, [IPv6]:PORT or a port number"
# PyYAML quotes tokens in its problems ("found undefined alias 'x'"); a token could be a secret.
# Keep token kinds ('<scalar>') and single characters ('\t'); drop anything else quoted.
_QUOTED: Final = re.compile(r"'(?!<[\w ]+>'|\\?.')[^']*'")
_S = TypeVar("_S", bound=str)
_D = TypeVar("_D")


class Raw(NamedTuple):
    """A value as the YAML wrote it, and the key path it was written at."""

    value: object
    path: str


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """A config that loads but should be fixed; the keeper logs it as ``event`` on every load.

    ``detail`` names paths and modes, never a secret.
    """

    event: str
    key_path: str
    detail: str


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise _DuplicateKey(key_node.value, key_node.start_mark.line + 1)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def type_name(value: object) -> str:
    """``a bool``, ``an integer``, ``a mapping``...: what errors say instead of the value."""
    for kind, name in ((bool, "a bool"), (int, "an integer"), (float, "a number")):
        if isinstance(value, kind):
            return name
    kinds = {str: "a string", list: "a list", dict: "a mapping", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def num(value: float) -> str:
    """A number as an operator wrote it: ``10`` not ``10.0``."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: only this host can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_hostname(host: str) -> bool:
    """An RFC 1123 hostname; an all-digit last label (``999.1.1.1``) is a bad IPv4, not a name."""
    labels = host.removesuffix(".").split(".")
    fits = len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)
    return fits and not _DIGITS.fullmatch(labels[-1])


def _is_ip(host: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(host)
    except ValueError:
        return False
    return True


def reach(host: str) -> str:
    """Who can connect to a listener on ``host``, in words, for ``deribit-keeper check``."""
    if is_loopback(host):
        return "loopback only"
    try:
        unspecified = ipaddress.ip_address(host.partition("%")[0]).is_unspecified
    except ValueError:
        unspecified = False
    return "every interface" if unspecified else "reachable from other hosts"


def bind_address(host: str, port: int) -> str:
    """``HOST:PORT`` as ``Checker.listen`` reads it back, an IPv6 host in brackets (``[::1]:0``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Checker:
    """Value checks for one document; ``display`` is the file name every error starts with."""

    def __init__(self, display: str, source: Path, environ: Mapping[str, str] | None) -> None:
        self.display = display
        self.source = source
        self.environ = os.environ if environ is None else environ
        self.warnings: list[ConfigWarning] = []

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.display, path, problem)

    def parse_yaml(self, text: str) -> object:
        """The parsed document. The problem is built inside ``except`` and raised outside it, so
        the YAML exception (whose text quotes the offending line) is not chained onto ours."""
        try:
            return yaml.load(text, Loader=_StrictLoader)
        except _DuplicateKey as exc:
            problem = f"invalid YAML at line {exc.line}: duplicate key {exc.key!r}"
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = f"invalid YAML{where}: " + _QUOTED.sub("'...'", exc.problem or "syntax error")
        except yaml.reader.ReaderError as exc:
            problem = f"invalid YAML: {exc.reason} (character {exc.position})"
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: 2024-13-45
            problem = f"invalid YAML: cannot build the document ({type(exc).__name__})"
        raise self.error("", problem)

    def mapping(self, raw: Raw, known: tuple[str, ...], *, null_ok: bool = False) -> dict[str, Raw]:
        """The entries of a mapping, each with its key path; unknown or non-string keys are errors.

        ``null_ok`` accepts an empty section (``defaults:`` with every line commented out).
        """
        if raw.value is None and null_ok:
            return {}
        if not isinstance(raw.value, dict):
            what = "must be a mapping" if raw.path else "the top level must be a mapping"
            raise self.error(raw.path, f"{what}, got {type_name(raw.value)}")
        entries: dict[str, Raw] = {}
        for key, value in raw.value.items():
            if not isinstance(key, str):
                raise self.error(raw.path, f"keys must be strings, got {type_name(key)}")
            path = child_path(raw.path, key)
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise self.error(path, f"unknown key{hint}")
            entries[key] = Raw(value, path)
        return entries

    def string(self, raw: Raw) -> str:
        """A string; the error names only the type, since the value may be a secret."""
        if not isinstance(raw.value, str):
            scalar = (int, float, bool, datetime.date)
            hint = " (quote it in YAML)" if isinstance(raw.value, scalar) else ""
            raise self.error(raw.path, f"must be a string, got {type_name(raw.value)}{hint}")
        return raw.value

    def choice(self, raw: Raw | None, options: tuple[_S, ...], default: _D) -> _S | _D:
        """One of ``options`` exactly (``INFO`` is not ``info``), or ``default`` when absent."""
        if raw is None:
            return default
        for option in options:
            if raw.value == option:
                return option
        got = repr(raw.value) if isinstance(raw.value, str) else type_name(raw.value)
        raise self.error(raw.path, f"must be one of {', '.join(options)}; got {got}")

    def seconds(
        self, raw: Raw | None, default: float, low: float, high: float, *, inclusive: bool = False
    ) -> float:
        """A finite number in (low, high], or [low, high] if ``inclusive``; a bool is no number."""
        if raw is None:
            return default
        value = raw.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(raw.path, f"must be a number of seconds, got {type_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(raw.path, f"must be a finite number, got {value}")
        if value < low or (value == low and not inclusive):
            relation = ">=" if inclusive else ">"
            raise self.error(raw.path, f"must be {relation} {num(low)}, got {num(value)}")
        if value > high:
            raise self.error(raw.path, f"must be <= {num(high)}, got {num(value)}")
        return float(value)

    def url(self, raw: Raw) -> str:
        """A ``wss://`` URL, or ``ws://`` to a loopback host; never echoed (it may hold a token)."""
        text = self.string(raw)
        try:
            parts = urlsplit(text)
            host, _ = parts.hostname, parts.port
        except ValueError:
            raise self.error(raw.path, "is not a valid URL") from None
        if any(c.isspace() for c in text):
            raise self.error(raw.path, "must not contain whitespace")
        if parts.scheme not in ("ws", "wss"):
            raise self.error(raw.path, "must be a wss:// URL (ws:// only for a loopback host)")
        if not host:
            raise self.error(raw.path, "has no host")
        if parts.username is not None or parts.password is not None:
            raise self.error(raw.path, "must not contain user:password@")
        if parts.query or parts.fragment:
            raise self.error(raw.path, "must not have a ?query or #fragment")
        if parts.scheme == "ws" and not is_loopback(host):
            loopback = "a loopback host (127.0.0.0/8, ::1, localhost)"
            raise self.error(raw.path, f"ws:// is only allowed to {loopback}; use wss://")
        return text

    def ordered(
        self, low: tuple[Raw | None, float, str], high: tuple[Raw | None, float, str]
    ) -> None:
        """Require ``low <= high`` for two merged values, each ``(raw or None, value, name)``.

        The error blames the key set closer to the account (``accounts[i]``, not ``defaults``);
        on a tie, the upper one. A value left at its built-in default (no raw) is never blamed.
        """
        (low_raw, low_value, low_name), (high_raw, high_value, high_name) = low, high
        if low_value <= high_value:
            return
        own = [raw is not None and raw.path.startswith("accounts") for raw in (low_raw, high_raw)]
        if low_raw and (not high_raw or (own[0] and not own[1])):
            problem = f"must be <= {high_name} ({num(high_value)}), got {num(low_value)}"
            raise self.error(low_raw.path, problem)
        if high_raw:  # with neither key set the built-in defaults are in order
            problem = f"must be >= {low_name} ({num(low_value)}), got {num(high_value)}"
            raise self.error(high_raw.path, problem)

    def listen(self, raw: Raw) -> tuple[str, int]:
        """``(host, port)`` from ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or a bare port.

        A bare port, written as an integer or as digits, and ``:PORT`` listen on 127.0.0.1, so
        nothing is exposed unless a host is written out. The host is returned without brackets.
        Port 0 picks any free port. A hostname is checked for shape only: nothing is resolved.
        """
        value = raw.value
        if isinstance(value, int) and not isinstance(value, bool):
            return LOOPBACK_HOST, self.port(raw, value)
        if not isinstance(value, str) or not value:
            got = "an empty string" if value == "" else type_name(value)
            raise self.error(raw.path, f"must be {_LISTEN_FORMS}, got {got}")
        if any(c.isspace() for c in value):
            raise self.error(raw.path, "must not contain whitespace")
        if _DIGITS.fullmatch(value):
            return LOOPBACK_HOST, self.port(raw, value)
        if value.startswith("["):
            host, _, port = value[1:].partition("]")
            if port and not port.startswith(":"):
                raise self.error(raw.path, f"must be [IPv6]:PORT, got {value!r}")
            if not _is_ip(host, ipaddress.IPv6Address):
                raise self.error(raw.path, f"[...] must hold an IPv6 address, got {host!r}")
            port = port[1:]
        else:
            host, colon, port = value.rpartition(":")
            if not colon:  # "localhost", "127.0.0.1": a bare host, and ports are never implied
                port = ""
            elif ":" in host:
                raise self.error(raw.path, "an IPv6 address goes in brackets, e.g. [::1]:9464")
            if host and not (_is_hostname(host) or _is_ip(host, ipaddress.IPv4Address)):
                problem = f"host must be an IP address or a hostname, got {host!r}"
                raise self.error(raw.path, problem)
        if not port:
            raise self.error(raw.path, f"has no port: write {_LISTEN_FORMS}, got {value!r}")
        return host or LOOPBACK_HOST, self.port(raw, port)

    def port(self, raw: Raw, value: int | str) -> int:
        """A TCP port, 0 to 65535, from an integer or from ASCII digits."""
        if isinstance(value, str):
            if not _DIGITS.fullmatch(value):
                problem = f"port must be a number from 0 to {PORT_MAX}, got {value!r}"
                raise self.error(raw.path, problem)
            if len(value.lstrip("0")) > len(str(PORT_MAX)):  # int() refuses 4301 digits
                problem = f"port must be from 0 to {PORT_MAX}, got a {len(value)}-digit number"
                raise self.error(raw.path, problem)
            value = int(value)
        if not 0 <= value <= PORT_MAX:
            raise self.error(raw.path, f"port must be from 0 to {PORT_MAX}, got {value}")
        return value

    def expand(self, raw: Raw) -> tuple[str, list[str]]:
        """The string with each ``${VAR}`` replaced from the environment, and the names used."""
        text = self.string(raw)
        if "${" in _VAR_REF.sub("", text):
            raise self.error(raw.path, "has a ${ without its closing }")
        names: list[str] = []
        for match in _VAR_REF.finditer(text):
            name = match.group(1)
            if not _VAR_NAME.fullmatch(name):
                raise self.error(raw.path, "${...} must hold an environment variable name")
            if name not in self.environ:
                raise self.error(raw.path, f"environment variable {name} is not set")
            names.append(name)
        return _VAR_REF.sub(lambda m: self.environ[m.group(1)], text), names

    def client_id(self, raw: Raw) -> str:
        """A client id, an account's or a local client's: ``${VAR}`` expanded, no whitespace."""
        client_id, _ = self.expand(raw)
        if not client_id or any(c.isspace() for c in client_id):
            raise self.error(raw.path, "must be non-empty, without whitespace")
        return client_id

    def secret(self, own: dict[str, Raw], owner_path: str) -> tuple[str, str]:
        """The one secret of ``own`` (an account or a local client) and where it came from:
        ``env X``, ``file /p`` or ``inline``.

        A secret must be one line without surrounding whitespace: a stray space or a second line
        would otherwise surface much later as Deribit's opaque ``invalid_credentials``.
        """
        given = [key for key in SECRET_KEYS if key in own]
        if len(given) != 1:
            problem = f"{' and '.join(given)} are set; keep exactly one"
            raise self.error(owner_path, problem if given else f"no secret: set one of {_ONE_OF}")
        raw = own[given[0]]
        if given[0] == "client_secret":
            value, names = self.expand(raw)
            if names and raw.value == f"${{{names[0]}}}":
                origin = f"env {names[0]}"
            else:
                origin = "inline" + (f" with env {', '.join(names)}" if names else "")
        elif given[0] == "client_secret_env":
            name = self.string(raw)
            if not _VAR_NAME.fullmatch(name):
                raise self.error(raw.path, "must be an environment variable name")
            if name not in self.environ:
                raise self.error(raw.path, f"environment variable {name} is not set")
            value, origin = self.environ[name], f"env {name}"
        else:
            path = self.secret_path(raw)
            value, origin = self.read_secret(raw, path), f"file {path}"
        if not value:
            raise self.error(raw.path, f"the secret from {origin} is empty")
        if "\n" in value or "\r" in value:
            problem = f"the secret from {origin} holds more than one line"
            raise self.error(raw.path, problem + " (only one trailing newline is stripped)")
        if value != value.strip():
            problem = f"the secret from {origin} has leading or trailing whitespace"
            raise self.error(raw.path, problem)
        return value, origin

    def secret_path(self, raw: Raw) -> Path:
        """Relative paths resolve under ``$CREDENTIALS_DIRECTORY`` if set, else beside the file."""
        text = self.string(raw)
        if not text:
            raise self.error(raw.path, "must be a file path, got an empty string")
        credentials = self.environ.get(CREDENTIALS_DIR_VAR)
        return (Path(credentials) if credentials else self.source.parent) / text

    def read_secret(self, raw: Raw, path: Path) -> str:
        """The file's text without one trailing newline; errors never quote the content.

        The mode checked for ``config.secret_file_readable`` is that of the file actually read
        (``fstat`` on the open file), not of whatever the path names a moment later.
        """
        try:
            with path.open("rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                text = file.read().decode("utf-8")
        except OSError as exc:
            problem = f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        except UnicodeDecodeError:  # it holds the bytes: raise outside, unchained
            problem = f"{path} is not UTF-8 text"
        except ValueError:  # a NUL byte, or a lone surrogate: no OS takes that path
            problem = "is not a path the OS can open (a NUL byte or an invalid character)"
        else:
            self.check_mode(raw, path, mode)
            return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
        raise self.error(raw.path, problem)

    def check_mode(self, raw: Raw, path: Path, mode: int) -> None:
        """Warn when group or others may read a secret file outside ``$CREDENTIALS_DIRECTORY``.

        Files under it are exempt: systemd makes that directory private to the service, whatever
        the modes inside. Anywhere else the file is still used, so a deploy that shipped 0644 keeps
        working, but the warning is logged on every load until someone runs chmod.
        """
        credentials = self.environ.get(CREDENTIALS_DIR_VAR)
        if credentials:
            try:
                if path.resolve().is_relative_to(Path(credentials).resolve()):
                    return
            except (OSError, RuntimeError):  # a symlink loop: cannot tell, so check the mode
                pass
        if mode & _OTHERS_READ:
            detail = f"{path} is mode {stat.S_IMODE(mode):04o}; chmod 600 it"
            self.warnings.append(ConfigWarning(SECRET_FILE_READABLE, raw.path, detail))


def child_path(parent: str, key: str) -> str:
    """The key path of ``parent``'s entry ``key``: ``http.listen``, or, for a key that is not
    a plain name, the key quoted (``http["."]``), so that no key can make a path read as
    another one."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key)}]"
