"""Checks for an account's ``gateway`` block: the local endpoint trading engines connect to.

Private to ``config.py``, which owns the dataclasses (``GatewayConfig``, ``LocalClient``) and
calls in here from its loader (a ``GatewayChecker``) and from ``describe``. Why it looks like this:

* **Local credentials, never Deribit's.** A gateway's clients authenticate with ids and secrets
  that are good only here; a local secret equal to the account's Deribit secret is an error, so an
  engine's config never holds a key that works at Deribit. Errors say so without either value.
* **Loopback unless protected.** ``auth: none`` (no local authentication) is allowed only on a
  loopback listen; the block must say one or the other, never both and never neither.
* **One port, one listener.** Two gateways, or a gateway and ``http.listen``, may not share a
  port; checked over the whole document, since each account's block alone cannot tell.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ._config_validate import SECRET_KEYS, Checker, Raw, bind_address, is_loopback, reach, type_name

if TYPE_CHECKING:
    from .config import AccountConfig, GatewayAuth, GatewayConfig, HttpConfig, LocalClient

GATEWAY_PATH: Final = "/ws/api/v2"  # Deribit's path, so an engine changes only host and port
# Links at once: 1024 is the usual RLIMIT_NOFILE soft limit, and every link is a file descriptor.
MAX_CLIENTS_LIMIT: Final = 1024
_GATEWAY_KEYS: Final = ("listen", "clients", "auth", "cancel_on_disconnect", "max_clients")
_CLIENT_KEYS: Final = ("client_id", *SECRET_KEYS)
_WILDCARDS: Final = frozenset({"0.0.0.0", "::"})  # a listener there takes the port everywhere


def describe_gateway(gateway: GatewayConfig | None) -> str:
    """The gateway in one line for ``deribit-keeper check``: where secrets come from, no values."""
    if gateway is None:
        return "off"
    if gateway.auth == "none":
        who = "no local authentication"
    else:
        who = "clients: " + ", ".join(
            f"{c.client_id} (secret: {c.secret_source})" for c in gateway.clients
        )
    cod = "on" if gateway.cancel_on_disconnect else "off"
    return (
        f"ws://{gateway.bind}{GATEWAY_PATH} ({reach(gateway.host)}); {who}; "
        f"local COD {cod}; max {gateway.max_clients} links"
    )


def _clash(host: str, other: str) -> bool:
    """Whether listeners on ``host`` and ``other`` cannot both hold one port: the same address
    (``::1`` is ``0:0::1``; names compare without case), or either one a wildcard."""
    same = {_normal(host), _normal(other)}
    return len(same) == 1 or bool(same & _WILDCARDS)


def _normal(host: str) -> str:
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower().removesuffix(".")


class GatewayChecker(Checker):
    """Value checks plus the ``gateway`` block itself, for ``config.py``'s loader to inherit."""

    def gateway(self, raw: Raw | None, *, deribit_secret: str) -> GatewayConfig | None:
        """The account's gateway, or None without a block (or with every line commented out).

        ``deribit_secret`` is the account's own secret, which no local client may reuse.
        """
        from .config import GatewayConfig  # config.py imports this module: import it late

        if raw is None:
            return None
        block = self.mapping(raw, _GATEWAY_KEYS, null_ok=True)
        if not block:
            return None
        if "listen" not in block:
            raise self.error(f"{raw.path}.listen", "required key is missing")
        host, port = self.listen(block["listen"])
        auth = self.gateway_auth(block, raw.path, host, port)
        plain = GatewayConfig(host, port)  # its field defaults stand for the keys left out
        return GatewayConfig(
            host=host,
            port=port,
            clients=() if auth == "none" else self.local_clients(block["clients"], deribit_secret),
            auth=auth,
            cancel_on_disconnect=self.flag(
                block.get("cancel_on_disconnect"), plain.cancel_on_disconnect
            ),
            max_clients=self.count(block.get("max_clients"), plain.max_clients, MAX_CLIENTS_LIMIT),
        )

    def gateway_auth(self, block: dict[str, Raw], path: str, host: str, port: int) -> GatewayAuth:
        """``none`` when written (on a loopback host only), else ``clients``, which must be set."""
        auth = block.get("auth")
        if auth is None:
            if "clients" not in block:
                problem = "no local authentication set: list clients, or set auth: none"
                raise self.error(path, f"{problem} (loopback listen only)")
            return "clients"
        if auth.value != "none":
            got = repr(auth.value) if isinstance(auth.value, str) else type_name(auth.value)
            raise self.error(
                auth.path, f"must be none (leave it out to require clients); got {got}"
            )
        if "clients" in block:
            raise self.error(path, "clients and auth: none are both set; keep one")
        if not is_loopback(host):
            where = f"{bind_address(host, port)} ({reach(host)})"
            raise self.error(auth.path, f"none is only allowed on a loopback listen, not {where}")
        return "none"

    def local_clients(self, raw: Raw, deribit_secret: str) -> tuple[LocalClient, ...]:
        """Each local client's id (unique in this gateway) and secret, read as an account's is."""
        from .config import LocalClient, Secret  # config.py imports this module: import it late

        items = raw.value
        if items is None or items == []:
            raise self.error(raw.path, "must list at least one client")
        if not isinstance(items, list):
            raise self.error(raw.path, f"must be a list of clients, got {type_name(items)}")
        clients: list[LocalClient] = []
        first: dict[str, str] = {}
        for i, item in enumerate(items):
            entry = Raw(item, f"{raw.path}[{i}]")
            own = self.mapping(entry, _CLIENT_KEYS)
            if "client_id" not in own:
                raise self.error(f"{entry.path}.client_id", "required key is missing")
            client_id = self.client_id(own["client_id"])
            if client_id in first:
                raise self.error(
                    own["client_id"].path, f"{client_id!r} is already {first[client_id]}"
                )
            first[client_id] = own["client_id"].path
            value, source = self.secret(own, entry.path)
            secret = Secret(value)
            if secret == Secret(deribit_secret):  # compared in constant time, never shown
                key = next(own[k] for k in SECRET_KEYS if k in own)
                problem = (
                    "must not be the account's Deribit secret: a gateway's credentials are local"
                )
                raise self.error(key.path, problem)
            clients.append(LocalClient(client_id, secret, secret_source=source))
        return tuple(clients)

    def flag(self, raw: Raw | None, default: bool) -> bool:
        """``true`` or ``false``, or ``default`` when absent; a string is never a bool."""
        if raw is None:
            return default
        if not isinstance(raw.value, bool):
            raise self.error(raw.path, f"must be true or false, got {type_name(raw.value)}")
        return raw.value

    def count(self, raw: Raw | None, default: int, high: int) -> int:
        """A whole number from 1 to ``high``, or ``default`` when absent; a bool is no number."""
        if raw is None:
            return default
        value = raw.value
        if isinstance(value, bool) or not isinstance(value, int):
            got = type_name(value)
        elif not 1 <= value <= high:
            got = str(value)
        else:
            return value
        raise self.error(raw.path, f"must be an integer from 1 to {high}, got {got}")

    def unique_listens(self, accounts: Sequence[AccountConfig], http: HttpConfig | None) -> None:
        """No two listeners share a port: gateways among themselves and with ``http.listen``.

        Port 0 (any free port) never clashes. The later one is blamed, ``http.listen`` never.
        """
        taken = [("http.listen", http.host, http.port)] if http is not None else []
        for i, account in enumerate(accounts):
            if (gateway := account.gateway) is None:
                continue
            path = f"accounts[{i}].gateway.listen"
            for where, host, port in taken:
                if port == gateway.port != 0 and _clash(host, gateway.host):
                    verb = "is already" if _normal(host) == _normal(gateway.host) else "overlaps"
                    other = bind_address(host, port)
                    spelt = "" if other == gateway.bind else f" ({other})"
                    raise self.error(path, f"{gateway.bind} {verb} {where}{spelt}")
            taken.append((path, gateway.host, gateway.port))
