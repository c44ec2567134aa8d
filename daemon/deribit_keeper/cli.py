"""The ``deribit-keeper`` command: run | check | status | cancel-all | simulate | demo | probe.

Exit codes follow sysexits: 0 after a clean stop, 78 (EX_CONFIG) for any configuration problem,
reported as one line naming the file, the key path and what is wrong; 1 for anything unexpected.
``cancel-all`` exits 1, with one line on stderr, when the running keeper refuses or cannot do it.
``status`` exits 0 when every account is ready, 1 when one is not, 2 when the keeper cannot be
asked (status_command.py says why three).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final
from urllib.parse import quote

import trio

from . import __version__, events, logs
from .config import (
    HttpConfig,
    LogConfig,
    Secret,
    default_config_path,
    describe,
    load_config,
    load_http_config,
)
from .errors import ConfigError

EX_OK: Final = 0
EX_SOFTWARE: Final = 1
EX_CONFIG: Final = 78

# cancel-all waits for the keeper, which waits for Deribit up to the account's request timeout:
# allow that much plus this for the hop to the keeper itself.
# How long the command waits for the keeper, which itself answers 504 once the account's
# request_timeout has passed; a longer request_timeout makes the command say "outcome unknown".
CANCEL_ALL_TIMEOUT_S: Final = 30.0
_WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deribit-keeper",
        description="Keep one authenticated, COD-protected Deribit session per account.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the keeper in the foreground until SIGTERM/SIGINT")
    check = commands.add_parser("check", help="validate the config and print a summary")
    cancel_all = commands.add_parser(
        "cancel-all",
        help="cancel every open order of ACCOUNT through the running keeper's endpoint",
    )
    cancel_all.add_argument("account", metavar="ACCOUNT", help="the account's name in the config")
    status = commands.add_parser(
        "status",
        help="show the running keeper's accounts (exit 0 all ready, 1 not, 2 keeper unreachable)",
    )
    # status finds the endpoint in the config's http.listen, as cancel-all does, or is told it.
    status_where = status.add_mutually_exclusive_group()
    for each in (run, check, cancel_all, status_where):
        each.add_argument(
            "--config",
            type=Path,
            help="config file (default: $DERIBIT_KEEPER_CONFIG, else "
            "/etc/deribit-keeper/config.yaml)",
        )
    status_where.add_argument(
        "--url", help="the endpoint's base URL instead of the config's, e.g. http://127.0.0.1:9464"
    )
    status.add_argument("--json", action="store_true", help="print /status as it came")

    run.add_argument(
        "--shard",
        metavar="INDEX/COUNT",
        help="keep only this shard's accounts (default: $DERIBIT_KEEPER_SHARD, else all)",
    )

    probe = commands.add_parser("probe", help="exit 0 if URL answers 2xx (container health check)")
    probe.add_argument("url", help="e.g. http://127.0.0.1:9464/healthz")
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")

    simulate = commands.add_parser("simulate", help="serve a local Deribit simulator")
    simulate.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    simulate.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    simulate.add_argument(
        "--accounts", type=Path, required=True, help="YAML list of name, client_id, client_secret"
    )
    simulate.add_argument(
        "--token-ttl", type=float, default=900.0, help="access token life in seconds (default 900)"
    )

    demo = commands.add_parser("demo", help="simulator + keeper on loopback, with injected faults")
    demo.add_argument("--config", type=Path, default=Path("config/demo.yaml"))
    demo.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "run":
            return _run(args.config, args.shard)
        if args.command == "cancel-all":
            return _cancel_all(args.config, args.account)
        if args.command == "status":
            return _status(args.config, args.url, as_json=args.json)
        if args.command == "probe":
            from .probe import probe

            return probe(args.url, timeout=args.timeout)
        if args.command == "simulate":
            return _simulate(args.host, args.port, args.accounts, args.token_ttl)
        return _demo(args.config, args.fault_every)
    except ConfigError as error:
        print(f"deribit-keeper: {error}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return EX_OK  # Ctrl-C before the signal handler was installed: nothing to clean up


def _config_path(given: Path | None) -> Path:
    return given if given is not None else default_config_path(os.environ)


def _check(path: Path | None) -> int:
    config = load_config(_config_path(path))
    for line in describe(config):
        print(line)
    for warning in config.warnings:
        print(f"warning: {warning.key_path}: {warning.detail}")
    print("config ok")
    return EX_OK


def _run(path: Path | None, shard_arg: str | None) -> int:
    from .shard import configured_shard
    from .supervisor import Keeper

    config = load_config(_config_path(path))
    try:
        shard = configured_shard(shard_arg, os.environ)
    except ValueError as error:
        raise ConfigError("shard", "", str(error)) from None
    logs.configure(config.log)
    return _run_logged(lambda: trio.run(Keeper(config, shard=shard, freeze_heap=True).run))


def _cancel_all(path: Path | None, account: str) -> int:
    """Ask the running keeper (``http.listen``) to cancel every open order of ``account``.

    It goes through the keeper's own session: this process never talks to Deribit, so it reads
    only the config's ``http`` section (no account secret needs resolving) and the admin token,
    from the same file the keeper does.
    Prints the keeper's JSON answer on success; otherwise one line on stderr and exit 1.
    """
    source = _config_path(path)
    endpoint, token = _admin_endpoint(str(source), load_http_config(source))
    # A keeper listening on every address is reached on loopback, where it listens too.
    endpoint = replace(endpoint, host=_WILDCARDS.get(endpoint.host, endpoint.host))
    timeout = CANCEL_ALL_TIMEOUT_S
    try:
        status, body = _post_cancel_all(endpoint, account, token, timeout)
    except TimeoutError:
        unknown = "the orders may or may not be cancelled: check them or run cancel-all again"
        problem = f"no answer from the keeper at {endpoint.bind} within {timeout:g}s; {unknown}"
        return _cancel_all_error(account, problem)
    except ConnectionRefusedError:
        problem = f"nothing listens at {endpoint.bind}: is the keeper running?"
        return _cancel_all_error(account, problem)
    except (OSError, http.client.HTTPException) as error:
        problem = f"cannot reach the keeper at {endpoint.bind}: {type(error).__name__}: {error}"
        return _cancel_all_error(account, problem)
    if status == 401:
        hint = f"this command sent the token in {endpoint.admin_token_source}; if the keeper "
        hint += "started with another (or none), reload it (SIGHUP)"
        return _cancel_all_error(account, f"{_refusal(status, body)} ({hint})")
    if status != 200:
        return _cancel_all_error(account, _refusal(status, body))
    print(body.decode(errors="replace").strip())
    return EX_OK


def _status(path: Path | None, url: str | None, *, as_json: bool) -> int:
    """``deribit-keeper status``: the endpoint from ``--url``, else from the config's
    ``http.listen`` (read as cancel-all reads it: no secret needs resolving); the rest is
    status_command's."""
    from . import status_command

    where: status_command.Target | str
    if url is not None:
        where = url
    else:
        source = _config_path(path)
        endpoint = load_http_config(source)
        if endpoint is None:
            problem = "not set: status asks the running keeper's endpoint (or give --url)"
            raise ConfigError(str(source), "http.listen", problem)
        if endpoint.port == 0:
            problem = "port 0 is any free port, chosen at start-up: give status --url"
            raise ConfigError(str(source), "http.listen", problem)
        # A keeper listening on every address is reached on loopback, where it listens too.
        where = status_command.Target(_WILDCARDS.get(endpoint.host, endpoint.host), endpoint.port)
    return status_command.run(
        where, as_json=as_json, out=sys.stdout, err=sys.stderr, environ=os.environ
    )


def _admin_endpoint(source: str, endpoint: HttpConfig | None) -> tuple[HttpConfig, Secret]:
    """``http`` and its admin token, or the ConfigError that says what the config lacks.

    All is checked before anything is sent: without a section, a token or a known port no
    request could succeed.
    """
    if endpoint is None:
        problem = "not set: cancel-all asks the running keeper's endpoint, and this config has none"
        raise ConfigError(source, "http.listen", problem)
    if endpoint.admin_token is None:
        problem = "not set: the keeper refuses cancel-all to anyone without the admin token"
        raise ConfigError(source, "http.admin_token_file", problem)
    if endpoint.port == 0:
        problem = "port 0 is any free port, chosen at start-up: cancel-all cannot know which"
        raise ConfigError(source, "http.listen", problem)
    return endpoint, endpoint.admin_token


def _post_cancel_all(
    endpoint: HttpConfig, account: str, token: Secret, timeout: float
) -> tuple[int, bytes]:
    """POST the request and return the answer's status and body.

    ``timeout`` bounds the connect and each read. The CLI says it is the caller (the keeper logs
    ``source: cli``); the token travels only in the Authorization header.

    Raises:
        OSError: no connection, or no answer within ``timeout`` (TimeoutError).
        http.client.HTTPException: what answered does not speak HTTP.
    """
    from .http import ACCOUNTS_PREFIX, CANCEL_ALL_SUFFIX, CLI_SOURCE, SOURCE_HEADER

    route = f"{ACCOUNTS_PREFIX}{quote(account, safe='')}{CANCEL_ALL_SUFFIX}"
    connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
    headers = {
        "Authorization": f"Bearer {token.reveal()}",
        SOURCE_HEADER: CLI_SOURCE,
        "User-Agent": f"deribit-keeper/{__version__}",
    }
    try:
        connection.request("POST", route, b"", headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def _refusal(status: int, body: bytes) -> str:
    """One line from the keeper's error answer: its status, ``error`` and ``detail``."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "error" not in answer:
        return f"the keeper answered {status} {http.client.responses.get(status, '')}".rstrip()
    detail = answer.get("detail")
    return f"{status} {answer['error']}" + (f": {detail}" if detail else "")


def _cancel_all_error(account: str, problem: str) -> int:
    print(f"deribit-keeper: cancel-all {account}: {problem}", file=sys.stderr)
    return EX_SOFTWARE


def _simulate(host: str, port: int, accounts_file: Path, token_ttl: float) -> int:
    from .simulator import Simulator, load_accounts

    try:
        accounts = load_accounts(accounts_file)
    except ValueError as error:
        print(f"deribit-keeper: {error}", file=sys.stderr)
        return EX_CONFIG
    logs.configure(LogConfig(level="info", format="console"))
    simulator = Simulator(accounts, token_ttl_s=token_ttl, host=host)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.serve, port)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    return _run_logged(lambda: trio.run(serve))


def _demo(path: Path, fault_every: float) -> int:
    from .demo import run_demo

    if not path.is_file():
        raise ConfigError(str(path), "", "not found (run `make demo` from the repository root)")
    config = load_config(path)
    logs.configure(config.log)
    return _run_logged(lambda: trio.run(lambda: run_demo(config, fault_every_s=fault_every)))


def _run_logged(body: Callable[[], object]) -> int:
    """Run ``body`` and turn an unexpected crash into one logged event and exit code 1."""
    try:
        body()
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 (the last line of defence: log it, exit 1, systemd restarts)
        logs.get_logger().exception(events.KEEPER_CRASHED)
        return EX_SOFTWARE
    return EX_OK
