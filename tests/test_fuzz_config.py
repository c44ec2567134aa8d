"""Fuzzing the config loader and ``deribit-keeper check``: any document loads or is a ConfigError.

test_config.py holds the property tests of single rules (junk mappings, any text, ``http.listen``,
a secret among junk). Here whole documents are fuzzed, the way an operator's editor breaks them:
valid files (config/example.yaml, config/demo.yaml and a gateway-rich one) mutated key by key
(values replaced, keys renamed, deleted, duplicated, subtrees moved, types changed, nesting
added or removed) and line by line (lines dropped, doubled, swapped, re-indented, the file cut
short), plus YAML the loader rarely meets (anchors, aliases, tags, odd keys). Every outcome must
be a config or a ``ConfigError`` naming the file and, unless the document as a whole is at fault,
the key path; ``check`` on the same file must exit 0 or 78, in step with the loader, never with a
traceback. One real process shows the console script agrees.

The secrets taken from the environment and from files are registered with the suite's leak check
(``exposure``): no error or summary may show them, however the document is broken.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deribit_keeper.cli import EX_CONFIG, EX_OK, main
from deribit_keeper.config import KeeperConfig, load_config
from deribit_keeper.errors import ConfigError

from .conftest import Exposure

CONFIG_DIR: Final = Path(__file__).resolve().parents[1] / "config"

# Secrets reach the loader only through the environment and files, so that no mutation of the
# YAML can move one into a value an error quotes: any appearance in an output is a leak.
ENV_SECRETS: Final = {
    "DERIBIT_MAIN_SECRET": "main-ENV-SECRET-fuzz",
    "DERIBIT_ENGINE_SECRET": "engine-ENV-SECRET-fuzz",
    "SPARE_SECRET": "spare-ENV-SECRET-fuzz",
}
FILE_SECRETS: Final = {
    "hedge.secret": "hedge-FILE-SECRET-fuzz",
    "research.secret": "research-FILE-SECRET-fuzz",
    "admin.token": "admin-FILE-TOKEN-fuzz",
}

RICH: Final[dict[str, Any]] = {
    "log": {"level": "debug", "format": "console"},
    "http": {"listen": "127.0.0.1:0", "admin_token_file": "admin.token"},
    "defaults": {
        "environment": "test",
        "auth": "signature",
        "heartbeat_interval": 15,
        "cancel_on_disconnect": "connection",
        "on_shutdown": "close",
        "request_timeout": 5,
        "backoff": {"initial": 0.5, "max": 30},
        "cod_check_interval": 60,
        "on_start": "keep",
    },
    "accounts": [
        {
            "name": "main",
            "client_id": "AbCdEf12",
            "client_secret": "${DERIBIT_MAIN_SECRET}",
            "gateway": {
                "listen": 9601,
                "clients": [
                    {"client_id": "engine", "client_secret_env": "DERIBIT_ENGINE_SECRET"},
                    {"client_id": "research", "client_secret_file": "research.secret"},
                ],
                "cancel_on_disconnect": True,
                "max_clients": 8,
            },
        },
        {
            "name": "hedge",
            "client_id": "XyZ98765",
            "client_secret_file": "hedge.secret",
            "url": "ws://127.0.0.1:8765/ws/api/v2",
            "cancel_on_disconnect": "account",
            "backoff": {"max": 10},
            "gateway": {"listen": "[::1]:9602", "auth": "none"},
        },
        {"name": "spare", "client_id": "Qw12Er34", "client_secret_env": "SPARE_SECRET"},
    ],
}
SEEDS: Final = {
    "example": (CONFIG_DIR / "example.yaml").read_text(),
    "demo": (CONFIG_DIR / "demo.yaml").read_text(),
    "rich": yaml.safe_dump(RICH, sort_keys=False),
}
# What a document as a whole can be wrong in: these errors rightly name no key path (a key
# that is no string, at the top level, has no path to name either).
DOCUMENT_PROBLEMS: Final = (
    "invalid YAML",
    "the file is empty",
    "the top level must be a mapping",
    "keys must be strings",
)
# The loader's own parse (a pure-Python SafeLoader) dominates each example; the test's helper
# parses take libyaml's when PyYAML has it.
FAST_LOADER: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every example: the secret files the seeds name, mode 0600."""
    directory = tmp_path_factory.mktemp("fuzz-config")
    for name, secret in FILE_SECRETS.items():
        path = directory / name
        path.write_text(secret + "\n")
        path.chmod(0o600)
    return directory


@contextlib.contextmanager
def seed_environment() -> Iterator[None]:
    """The seeds' variables set, and no ``$CREDENTIALS_DIRECTORY`` to move the secret files."""
    with mock.patch.dict(os.environ, ENV_SECRETS):
        os.environ.pop("CREDENTIALS_DIRECTORY", None)
        yield


def registered(exposure: Exposure) -> Exposure:
    exposure.secrets.update(ENV_SECRETS.values())
    exposure.secrets.update(FILE_SECRETS.values())
    return exposure


# ---- what any document must do ---------------------------------------------------------------


def outcome(path: Path) -> KeeperConfig | ConfigError:
    """The loader's verdict on ``path``; anything but a ConfigError escapes and fails the test."""
    try:
        return load_config(path)
    except ConfigError as error:
        return error


def check_exit(path: Path, exposure: Exposure) -> tuple[int, str]:
    """``deribit-keeper check`` run in-process on ``path``: its exit code and its stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", "--config", str(path)])
    exposure.show(out.getvalue() + err.getvalue())
    return code, err.getvalue()


def assert_well_behaved(text: str, config_dir: Path, exposure: Exposure) -> None:
    """Load ``text`` from a file and check it: a config and exit 0, or a ConfigError naming its
    file and key path and exit 78 with that one line on stderr."""
    path = config_dir / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with seed_environment():
        verdict = outcome(path)
        code, stderr = check_exit(path, exposure)
    if isinstance(verdict, KeeperConfig):
        assert code == EX_OK, stderr
        return
    assert code == EX_CONFIG
    assert stderr == f"deribit-keeper: {verdict}\n"
    assert str(verdict).startswith(f"{path}: ")
    if not verdict.key_path:
        assert verdict.problem.startswith(DOCUMENT_PROBLEMS), verdict
    else:
        assert top_key(verdict.key_path) in top_keys_of(text) | {"accounts"}, verdict


def top_key(key_path: str) -> str:
    """``accounts`` for ``accounts[1].gateway.listen``: the section an error points into
    (``.`` for ``["."].x``, a key that is not a plain name being quoted)."""
    if key_path.startswith('["'):
        key, _ = json.JSONDecoder().raw_decode(key_path, 1)
        return str(key)
    return re.split(r"[.\[]", key_path, maxsplit=1)[0]


def top_keys_of(text: str) -> set[str]:
    document = parsed(text)
    return {k for k in document if isinstance(k, str)} if isinstance(document, dict) else set()


def parsed(text: str) -> object:
    """The document as YAML reads it, or None if it cannot (libyaml refuses some documents that
    PyYAML's own reader takes, a lone surrogate in an escape: then that reader decides)."""
    for loader in (FAST_LOADER, yaml.SafeLoader):
        try:
            return yaml.load(text, Loader=loader)
        except (yaml.YAMLError, ValueError, RecursionError):
            pass
    return None


def _entries(node: object, depth: int, key: object = None) -> Iterator[tuple[object, object]]:
    """Every ``(key, value)`` of the document, nested ones included; list items keep their key."""
    if depth > 50:  # an alias loop (&a [*a]): nothing new below
        return
    yield key, node
    if isinstance(node, dict):
        for child_key, value in node.items():
            yield from _entries(value, depth + 1, child_key)
    elif isinstance(node, list):
        for item in node:
            yield from _entries(item, depth + 1, key)


# ---- mutations -------------------------------------------------------------------------------

Node = tuple[str | int, ...]  # the path of one node in a parsed document

KNOWN_KEYS: Final = sorted(
    {
        key
        for seed in SEEDS.values()
        for key in re.findall(r"^\s*-?\s*#?\s*([a-z_]+):", seed, re.MULTILINE)
    }
    | {"client_secret", "client_secret_env", "client_secret_file", "admin_token_file", "auth"}
)
TEXT: Final = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12
) | st.sampled_from(
    [
        "",
        " ",
        "main",
        "test",
        "prod",
        "none",
        "account",
        "connection",
        "cancel_all",
        "logout",
        "0",
        "10",
        "-1",
        "1e999",
        "9601",
        "127.0.0.1:0",
        "[::1]:0",
        "0.0.0.0:9601",
        ":0",
        "localhost:0",
        "ws://127.0.0.1:1/ws/api/v2",
        "wss://test.deribit.com/ws/api/v2",
        "wss://[::1/x",
        "${DERIBIT_MAIN_SECRET}",
        "${UNSET_VARIABLE}",
        "${",
        "${}",
        "DERIBIT_MAIN_SECRET",
        "hedge.secret",
        "admin.token",
        "missing.secret",
        "/",
        ".",
        "/proc/self/status",
        "x" * 300,
        "9" * 40,
    ]
)
SCALARS: Final = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**30), 10**30)
    | st.sampled_from([0, 1, 5, 9, 10, 3600, 3601, 65535, 65536, 2**63, -(2**63)])
    | st.floats()
    | st.dates()
    | TEXT
)
JUNK: Final = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | TEXT, inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS: Final = st.sampled_from(KNOWN_KEYS) | TEXT | st.integers(-2, 2) | st.none() | st.booleans()


def nodes(tree: object, path: Node = ()) -> Iterator[Node]:
    """Every node's path, the root's first."""
    yield path
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from nodes(value, (*path, key))
    elif isinstance(tree, list):
        for index, item in enumerate(tree):
            yield from nodes(item, (*path, index))


def get(tree: Any, path: Node) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def mutate_tree(tree: Any, data: st.DataObject) -> Any:
    """One structural edit of ``tree`` (a copy), at a node hypothesis picks."""
    tree = copy.deepcopy(tree)
    every = list(nodes(tree))
    path = data.draw(st.sampled_from(every), label="node")
    how = data.draw(
        st.sampled_from(
            ["replace", "delete", "duplicate", "rename", "wrap", "unwrap", "retype", "graft"]
        ),
        label="edit",
    )
    node = get(tree, path)
    replacement: Any
    if how == "replace":
        replacement = data.draw(JUNK, label="value")
    elif how == "wrap":
        key = data.draw(st.sampled_from(KNOWN_KEYS), label="key")
        replacement = data.draw(st.sampled_from([[node], {key: node}]), label="wrapped")
    elif how == "unwrap" and isinstance(node, dict | list) and node:
        replacement = next(iter(node.values())) if isinstance(node, dict) else node[0]
    elif how == "retype":
        replacement = data.draw(
            st.sampled_from(
                [str(node), repr(node), [node], None, True, 0, -1, 1e308, float("nan")]
            ),
            label="retyped",
        )
    elif how == "graft":
        replacement = copy.deepcopy(get(tree, data.draw(st.sampled_from(every), label="from")))
    elif path and how in ("delete", "duplicate", "rename"):
        parent, last = get(tree, path[:-1]), path[-1]
        if how == "delete":
            del parent[last]
        elif isinstance(parent, list):  # duplicate in a list: the copy goes right after
            parent.insert(int(last) + 1, copy.deepcopy(node))
        else:  # a dict: the value under a second key too, or under this key only
            key = data.draw(KEYS, label="key")
            parent[key] = copy.deepcopy(node)
            if how == "rename" and key != last:
                del parent[last]
        return tree
    else:
        return tree
    if not path:
        return replacement
    get(tree, path[:-1])[path[-1]] = replacement
    return tree


def mutate_text(text: str, data: st.DataObject) -> str:
    """One edit of the file's lines or characters, as a slip in an editor makes."""
    lines = text.splitlines(keepends=True) or [""]
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    how = data.draw(
        st.sampled_from(["drop", "double", "swap", "indent", "dedent", "cut", "insert"]),
        label="text edit",
    )
    if how == "drop":
        del lines[i]
    elif how == "double":
        lines.insert(i, lines[i])
    elif how == "swap":
        j = data.draw(st.integers(0, len(lines) - 1), label="other line")
        lines[i], lines[j] = lines[j], lines[i]
    elif how == "indent":
        lines[i] = "  " + lines[i]
    elif how == "dedent":
        lines[i] = lines[i].lstrip(" ")
    elif how == "cut":
        return text[: data.draw(st.integers(0, len(text)), label="cut at")]
    else:
        at = data.draw(st.integers(0, len(text)), label="insert at")
        piece = data.draw(
            st.sampled_from(["-", ":", " ", "\t", "\n", "#", "&a ", "*a", "!!str ", "[", "{", "'"])
            | st.characters(),
            label="inserted",
        )
        return text[:at] + piece + text[at:]
    return "".join(lines)


# ---- YAML the loader rarely meets ------------------------------------------------------------

ODD_YAML: Final = st.sampled_from(
    [
        "a: &a [*a]\n",
        "accounts: &a\n- *a\n",
        "defaults: &d {environment: test, backoff: *d}\naccounts: [*d]\n",
        "accounts:\n- &m {name: main, client_id: abc, client_secret_env: SPARE_SECRET}\n- *m\n",
        "defaults: {<<: {environment: test}}\naccounts:\n- {<<: {name: m, client_id: c}}\n",
        "? [accounts]\n: []\n",
        "? {a: 1}\n: x\n",
        "!!python/object:os.system [echo]\n",
        "accounts: !!binary aGVsbG8=\n",
        "accounts: !!set {a, b}\n",
        "accounts: !!omap [a: 1]\n",
        "accounts: !!timestamp 2024-13-45\n",
        "accounts: !custom x\n",
        "%YAML 1.1\n---\naccounts: []\n",
        "--- a\n--- b\n",
        "---\n...\n",
        "\ufeffaccounts: []\n",
        "accounts: [" * 200 + "]" * 200 + "\n",
        "accounts: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
        "a: " + "[" * 1500 + "\n",  # deeper than Python's recursion limit
        "accounts:\n- name: main\n  name: main\n",
        "accounts: 0x_1F\ndefaults: {heartbeat_interval: 0o17}\n",
        "defaults: {heartbeat_interval: .inf, request_timeout: .nan}\naccounts: []\n",
        "defaults: {heartbeat_interval: 1_000}\naccounts: []\n",
        "log: {level: ~}\naccounts: [~]\n",
        "http: {listen: 1:2:3}\naccounts: []\n",
        "'\\x00': 1\n",
        '"\\ud800": 1\n',
    ]
)


# ---- the fuzz tests --------------------------------------------------------------------------

# The leak check's ``exposure`` is meant to gather across a test's every example, so its being
# function-scoped is right here, not the mistake hypothesis's health check warns of.
FUZZ: Final = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def test_every_seed_is_a_valid_config(config_dir: Path, exposure: Exposure) -> None:
    """The mutations start from files that load: otherwise they would fuzz only the first error."""
    registered(exposure)
    for name, text in SEEDS.items():
        path = config_dir / f"{name}.yaml"
        path.write_text(text)
        with seed_environment():
            assert isinstance(outcome(path), KeeperConfig), name
            assert check_exit(path, exposure)[0] == EX_OK, name


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), edits=st.integers(1, 4), data=st.data())
def test_any_mutation_of_a_valid_config_loads_or_is_a_config_error(
    config_dir: Path, exposure: Exposure, seed: str, edits: int, data: st.DataObject
) -> None:
    """Keys, values, types and nesting changed, entries deleted or doubled: a config or a
    ConfigError naming the key path, and ``check`` exits 0 or 78 accordingly."""
    registered(exposure)
    tree = yaml.safe_load(SEEDS[seed])
    for _ in range(edits):
        tree = mutate_tree(tree, data)
    text = yaml.safe_dump(tree, sort_keys=False)  # other than ASCII escaped: "\ud800" too
    assert_well_behaved(text, config_dir, exposure)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), edits=st.integers(1, 3), data=st.data())
def test_any_edit_of_a_valid_config_file_loads_or_is_a_config_error(
    config_dir: Path, exposure: Exposure, seed: str, edits: int, data: st.DataObject
) -> None:
    """Lines dropped, doubled (a duplicate key), swapped or re-indented, the file cut short or a
    stray character typed: a config or a ConfigError, and ``check`` agrees."""
    registered(exposure)
    text = SEEDS[seed]
    for _ in range(edits):
        text = mutate_text(text, data)
    assert_well_behaved(text, config_dir, exposure)


@settings(FUZZ, max_examples=40)
@given(
    document=st.dictionaries(KEYS, JUNK, max_size=5) | st.lists(JUNK, max_size=3) | SCALARS,
    odd=st.none() | ODD_YAML,
)
def test_any_yaml_document_loads_or_is_a_config_error(
    config_dir: Path, exposure: Exposure, document: object, odd: str | None
) -> None:
    """Any YAML value at all (non-string keys, dates, huge numbers), and YAML's odd corners
    (aliases that loop, tags, merge keys, deep nesting): a config or a ConfigError."""
    registered(exposure)
    text = odd if odd is not None else yaml.safe_dump(document)
    assert_well_behaved(text, config_dir, exposure)


def test_check_in_a_real_process_exits_78_with_one_line_and_no_traceback(
    config_dir: Path, exposure: Exposure
) -> None:
    """The console script agrees with ``main``: a broken file gets exit 78 and one line."""
    registered(exposure)
    tree = yaml.safe_load(SEEDS["rich"])
    tree["accounts"][1]["gateway"]["listen"] = {"port": [9602]}  # one of the fuzzers' shapes
    tree["accounts"].append(copy.deepcopy(tree["accounts"][0]))
    path = config_dir / "real.yaml"
    path.write_text(yaml.safe_dump(tree))
    with seed_environment():
        process = subprocess.run(
            [sys.executable, "-m", "deribit_keeper", "check", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    exposure.show(process.stdout + process.stderr)
    assert process.returncode == EX_CONFIG, process.stderr
    assert "Traceback" not in process.stderr
    assert process.stderr.startswith(f"deribit-keeper: {path}: accounts[1].gateway.listen: must")
    assert process.stderr.endswith("got a mapping\n") and process.stderr.count("\n") == 1


# ---- bugs the fuzzing found, each with the test that keeps it fixed ----------------------------


@pytest.mark.parametrize("path", ['"a\\0b"', '"\\ud800.secret"'], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    "where",
    [
        "accounts: [{name: m, client_id: c, client_secret_file: {path}}]",
        "http: {listen: 0, admin_token_file: {path}}\naccounts: [{name: m, client_id: c, "
        "client_secret_env: SPARE_SECRET}]",
        "accounts: [{name: m, client_id: c, client_secret_env: SPARE_SECRET, gateway: {listen: "
        "0, clients: [{client_id: e, client_secret_file: {path}}]}}]",
    ],
    ids=["account", "admin_token", "gateway_client"],
)
def test_a_secret_file_path_the_os_refuses_is_a_config_error(
    config_dir: Path, exposure: Exposure, where: str, path: str
) -> None:
    """A secret file path holding a NUL byte or a lone surrogate is a ConfigError naming it."""
    registered(exposure)
    text = "defaults: {environment: test}\n" + where.replace("{path}", path) + "\n"
    with seed_environment(), pytest.raises(ConfigError) as info:
        load_config(_written(config_dir, text))
    assert info.value.key_path.endswith("_file")


@pytest.mark.parametrize("listen", ["9" * 4301, "127.0.0.1:" + "9" * 4301])
def test_a_listen_port_of_over_4300_digits_is_a_config_error(
    config_dir: Path, exposure: Exposure, listen: str
) -> None:
    """``http.listen: "999...9"`` (4301 digits) is a ConfigError naming http.listen."""
    registered(exposure)
    text = (
        f'http: {{listen: "{listen}"}}\ndefaults: {{environment: test}}\n'
        "accounts: [{name: m, client_id: c, client_secret_env: SPARE_SECRET}]\n"
    )
    with seed_environment(), pytest.raises(ConfigError) as info:
        load_config(_written(config_dir, text))
    assert info.value.key_path == "http.listen"


def test_an_empty_top_level_key_is_named_in_the_error(config_dir: Path, exposure: Exposure) -> None:
    """``"": 1`` at the top level is an unknown key, and the error says which one."""
    registered(exposure)
    text = '"": 1\naccounts: [{name: m, client_id: c, client_secret_env: SPARE_SECRET}]\n'
    with seed_environment(), pytest.raises(ConfigError) as info:
        load_config(_written(config_dir, text))
    assert info.value.problem.startswith("unknown key")
    assert info.value.key_path != ""


def _written(directory: Path, text: str) -> Path:
    path = directory / "pinned.yaml"
    path.write_text(text)
    return path
