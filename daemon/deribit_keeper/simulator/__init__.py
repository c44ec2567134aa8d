"""A Deribit of our own: a JSON-RPC v2 WebSocket server with Cancel On Disconnect and faults.

Tests, the demo and users run it in-process (``port = await nursery.start(sim.serve, 0)``) or
from the CLI. It follows ../shared/deribit-protocol.md message for message and imports nothing of
the keeper but ``deribit_keeper.protocol``, ``deribit_keeper.signatures`` and
``deribit_keeper.jsonrpc`` (the facts, the signature rules and the framing rules both sides must
agree on), so the two cannot share a bug by sharing other code.
"""

from .accounts import SimAccount as SimAccount
from .accounts import load_accounts as load_accounts
from .records import SimConnection as SimConnection
from .server import Simulator as Simulator

__all__ = ["SimAccount", "SimConnection", "Simulator", "load_accounts"]
