"""The ``deribit-keeper`` command: run | check | simulate | demo | probe.

Exit codes follow sysexits: 0 after a clean stop, 78 (EX_CONFIG) for any configuration problem,
reported as one line naming the file, the key path and what is wrong; 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import trio

from . import __version__, events, logs
from .config import LogConfig, default_config_path, describe, load_config
from .errors import ConfigError

EX_OK: Final = 0
EX_SOFTWARE: Final = 1
EX_CONFIG: Final = 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deribit-keeper",
        description="Keep one authenticated, COD-protected Deribit session per account.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the keeper in the foreground until SIGTERM/SIGINT")
    check = commands.add_parser("check", help="validate the config and print a summary")
    for each in (run, check):
        each.add_argument(
            "--config",
            type=Path,
            help="config file (default: $DERIBIT_KEEPER_CONFIG, else "
            "/etc/deribit-keeper/config.yaml)",
        )

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
    return _run_logged(lambda: trio.run(Keeper(config, shard=shard).run))


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
