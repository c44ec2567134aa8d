"""The floor: bare trio-websocket clients that do only what keeps a Deribit link alive.

The keeper stands on trio-websocket, so what N idle WebSocket links cost in that library is a
cost no keeper can go below. This measures it in the same run and under the same load as the
keeper (run.py starts it against the same load simulator, pinned to the same core), so that the
keeper's memory and CPU targets are ratios to it rather than numbers from another day.

Each of ``--connections`` clients opens one WebSocket (trio-websocket starts its reader task),
sends ``public/set_heartbeat`` with ``--interval``, and then answers every ``test_request``
with ``public/test``, reading frames as JSON as any client must. Nothing else: no auth, no
COD, no timeouts, no logging, no bookkeeping. It runs until SIGTERM or SIGINT.

    python bench/floor.py --url ws://127.0.0.1:PORT/ws/api/v2 --connections 1000
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, open_websocket_url


async def keep_alive(url: str, interval: float) -> None:
    """One link: set the heartbeat, then answer every test_request, until the link ends."""
    async with open_websocket_url(url) as ws:
        await ws.send_message(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "public/set_heartbeat",
                    "params": {"interval": interval},
                }
            )
        )
        request_id = 1
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message.get("method") == "heartbeat" and (
                    message.get("params", {}).get("type") == "test_request"
                ):
                    request_id += 1
                    await ws.send_message(
                        json.dumps(
                            {
                                "jsonrpc": "2.0",
                                "id": request_id,
                                "method": "public/test",
                                "params": {},
                            }
                        )
                    )
        except ConnectionClosed:
            return


async def run(url: str, connections: int, interval: float) -> None:
    """Every link at once, as the keeper opens its sessions; ends on SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(keep_alive, url, interval)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=10.0, help="heartbeat, seconds")
    args = parser.parse_args(argv)
    trio.run(run, args.url, args.connections, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
