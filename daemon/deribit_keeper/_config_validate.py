"""Checks for single config values, each raising ``ConfigError`` with the value's key path.

Private to ``config.py``, which owns the structure (sections, defaults, accounts); this module knows
only values: YAML text, mappings, strings, choices, seconds, URLs, ``${VAR}`` and secret files.
An error about a value that might be a secret names its key, its type or its origin, never its text.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError

CREDENTIALS_DIR_VAR: Final = "CREDENTIALS_DIRECTORY"  # set by systemd's LoadCredential=
SECRET_KEYS: Final = ("client_secret", "client_secret_file", "client_secret_env")
_ONE_OF: Final = ", ".join(SECRET_KEYS)
_VAR_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR_REF: Final = re.compile(r"\$\{([^}]*)\}")
# PyYAML quotes tokens in its problems ("found undefined alias 'x'"); a token could be a secret.
# Keep token kinds ('<scalar>') and single characters ('\t'); drop anything else quoted.
_QUOTED: Final = re.compile(r"'(?!<[\w ]+>'|\\?.')[^']*'")
_S = TypeVar("_S", bound=str)
_D = TypeVar("_D")


class Raw(NamedTuple):
    """A value as the YAML wrote it, and the key path it was written at."""

    value: object
    path: str


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


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Checker:
    """Value checks for one document; ``display`` is the file name every error starts with."""

    def __init__(self, display: str, source: Path, environ: Mapping[str, str] | None) -> None:
        self.display = display
        self.source = source
        self.environ = os.environ if environ is None else environ

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
            path = f"{raw.path}.{key}" if raw.path else key
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
        if parts.scheme == "ws" and not _is_loopback(host):
            loopback = "a loopback host (127.0.0.0/8, ::1, localhost)"
            raise self.error(raw.path, f"ws:// is only allowed to {loopback}; use wss://")
        return text

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

    def secret(self, own: dict[str, Raw], account_path: str) -> tuple[str, str]:
        """The account's one secret and where it came from: ``env X``, ``file /p`` or ``inline``.

        A secret must be one line without surrounding whitespace: a stray space or a second line
        would otherwise surface much later as Deribit's opaque ``invalid_credentials``.
        """
        given = [key for key in SECRET_KEYS if key in own]
        if len(given) != 1:
            problem = f"{' and '.join(given)} are set; keep exactly one"
            raise self.error(account_path, problem if given else f"no secret: set one of {_ONE_OF}")
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
        """The file's text without one trailing newline; errors never quote the content."""
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            problem = f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        except UnicodeDecodeError:  # it holds the bytes: raise outside, unchained
            problem = f"{path} is not UTF-8 text"
        else:
            return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
        raise self.error(raw.path, problem)
