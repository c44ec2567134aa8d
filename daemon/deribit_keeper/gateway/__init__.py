"""The engine's local Deribit endpoint, one per account: see ``gateway.py`` for why it exists.

Modules, by concern: ``listener`` (the ASGI app hypercorn serves), ``link`` (one local
WebSocket: what the keeper answers itself, what it relays), ``local_auth`` (the gateway's own
clients and tokens), ``fanout`` (one upstream subscription per channel), ``orders`` (which open
orders each link created: what local COD cancels), ``frames`` (relayed answers; Deribit's
envelope itself is ``jsonrpc.py``'s, shared with the simulator).
"""

from .gateway import Gateway as Gateway
from .link import End as End

__all__ = ["End", "Gateway"]
