"""What the fault matrix needs besides the simulator: a network hop that can fail before any
WebSocket exists (a reset, a blackhole, TLS with a bad certificate), a name that can stop
resolving, and the certificates.

The simulator models Deribit, so it breaks what Deribit can break: handshakes, frames, answers.
What breaks *before* Deribit (the TCP connect, TLS, DNS) is the network's, so it lives here, on
the test side: ``Wire`` is a TCP hop in front of the simulator that terminates TLS with whatever
certificate a test chooses, and ``Names`` answers the keeper's name lookups without a thread (a
real lookup runs in a worker thread, and on the autojump clock virtual time would race past the
connect timeout while the thread works).
"""

from __future__ import annotations

import datetime
import socket
import ssl
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import trio
import trustme

from deribit_keeper.simulator.connection import reset_on_close

HOST = "deribit-fault.invalid"  # .invalid is reserved (RFC 2606): it never resolves for real
CertProblem = Literal["unknown_ca", "wrong_host", "expired"]
WireFault = Literal["reset", "blackhole"] | CertProblem


@dataclass(frozen=True)
class Certificates:
    """A trusted CA with a good certificate for HOST, and the three ways a certificate fails."""

    trusted: trustme.CA
    good: trustme.LeafCert
    bad: dict[str, trustme.LeafCert]

    def client_context(self) -> ssl.SSLContext:
        """What the keeper verifies with: the system's defaults, trusting only our CA."""
        context = ssl.create_default_context()
        self.trusted.configure_trust(context)
        return context

    def server_context(self, problem: CertProblem | None) -> ssl.SSLContext:
        """The Wire's side: the good certificate, or the one with ``problem``."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (self.good if problem is None else self.bad[problem]).configure_cert(context)
        return context


@cache
def certificates() -> Certificates:
    """Made once per test run: key generation is the slow part, and the certificates never
    change."""
    trusted, rogue = trustme.CA(), trustme.CA()
    long_ago = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    return Certificates(
        trusted=trusted,
        good=trusted.issue_cert(HOST),
        bad={
            "unknown_ca": rogue.issue_cert(HOST),
            "wrong_host": trusted.issue_cert("other-host.invalid"),
            "expired": trusted.issue_cert(
                HOST, not_before=long_ago, not_after=long_ago + datetime.timedelta(days=1)
            ),
        },
    )


@dataclass
class Wire:
    """A TCP hop in front of the simulator: TLS terminated here, bytes piped to ``target_port``.

    ``fault`` says what the next connections meet: ``reset`` (accepted, then reset at once),
    ``blackhole`` (accepted, then nothing is read or sent), a certificate problem (the TLS
    handshake presents a bad certificate), or None (a good certificate, and through). Every
    connection that met a fault is noted in ``triggered`` with its Trio time.
    """

    target_port: int
    certs: Certificates
    fault: WireFault | None = None
    port: int = 0
    triggered: list[tuple[float, str]] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port until cancelled; report it through ``task_status``."""
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listener.socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, [listener])
            task_status.started(self.port)

    async def _handle(self, client: trio.SocketStream) -> None:
        fault = self.fault
        try:
            if fault is not None:
                self.triggered.append((trio.current_time(), fault))
            if fault == "reset":
                reset_on_close(client)
                return
            if fault == "blackhole":
                await _drain(client)
                return
            problem = fault  # a certificate problem, or None
            tls = trio.SSLStream(client, self.certs.server_context(problem), server_side=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError:
                return  # the client refused our certificate: what a bad one is for
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, tls, upstream, nursery.cancel_scope)
                nursery.start_soon(_pipe, upstream, tls, nursery.cancel_scope)
        finally:
            await trio.aclose_forcefully(client)


async def _drain(stream: trio.SocketStream) -> None:
    """Read and ignore everything until the peer leaves: TCP open, nothing answered."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        return  # reset by the peer: it has left


async def _pipe(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
    """Copy ``source`` to ``sink`` until either ends; then end the whole hop."""
    try:
        while data := await source.receive_some():
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # either side went away: the hop is over, as below
    finally:
        done.cancel()


class Names(trio.abc.HostnameResolver):
    """Resolves HOST to loopback, or fails as a name that does not exist while ``failing``.

    Only HOST is known: any other name is an error here, so no test can reach a real resolver.
    """

    def __init__(self) -> None:
        self.failing = False
        self.lookups: list[tuple[float, bool]] = []  # (Trio time, whether it failed)

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        await trio.lowlevel.checkpoint()
        name = host.decode() if isinstance(host, bytes) else host
        failing = self.failing or name != HOST
        self.lookups.append((trio.current_time(), failing))
        if failing:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        number = int(port.decode() if isinstance(port, bytes) else port or 0)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", number))]

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        raise NotImplementedError("the keeper never asks for a name")


def installed_names() -> Names:
    """A ``Names`` installed as trio's resolver for the current run (a RunVar: one test)."""
    names = Names()
    trio.socket.set_custom_hostname_resolver(names)
    return names
