"""One upstream subscription per channel, shared by every local link that wants it.

Deribit sends each notification once per connection that subscribed, and every local link of an
account shares one upstream connection, so the keeper subscribes upstream once per channel,
copies each notification to every link subscribed to it, and unsubscribes upstream when the
last link leaves the channel (a link that ends leaves all its channels).

Every change to who is subscribed to what happens under one lock, together with the upstream
request it needs, so a subscribe racing the last unsubscribe of the same channel can never leave
a link subscribed locally to a channel that is gone upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import trio

from ..errors import NotReady, SessionLost
from ..jsonrpc import Request, RpcFault, notification_frame
from ..protocol import ErrorCode
from .frames import get_channels

if TYPE_CHECKING:
    from .gateway import Gateway
    from .link import LocalLink

PRIVATE_PREFIX: Final = "user."  # the account's own channels: orders, trades, portfolio, ...


def _check_allowed(link: LocalLink, method: str, channels: list[str]) -> None:
    """An unauthenticated link never reads the account's private channels, though the upstream
    connection could: 13778 for a ``.raw`` one, as Deribit answers, else 13009."""
    if link.authenticated or method.startswith("private/"):
        return  # private/ methods were checked for auth before they got here
    for channel in channels:
        if channel.startswith(PRIVATE_PREFIX):
            if channel.endswith(".raw"):
                raise RpcFault(ErrorCode.RAW_SUBSCRIPTIONS_NOT_AVAILABLE)
            raise RpcFault(ErrorCode.UNAUTHORIZED)


def _unique(channels: list[str]) -> list[str]:
    return list(dict.fromkeys(channels))


class Fanout:
    """Which links are subscribed to which channel, for one account's gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._subscribers: dict[str, set[LocalLink]] = {}
        self._lock = trio.Lock()

    def channels(self) -> list[str]:
        """The channels subscribed upstream now."""
        return sorted(self._subscribers)

    def deliver(self, params: Any) -> None:
        """Copy one ``subscription`` notification to every link subscribed to its channel."""
        channel = params.get("channel") if isinstance(params, dict) else None
        links = self._subscribers.get(channel) if isinstance(channel, str) else None
        if not links:
            return
        frame = notification_frame("subscription", params)
        for link in list(links):
            link.push(frame)

    def reset(self) -> None:
        """The upstream connection is gone, and its subscriptions with it."""
        self._subscribers.clear()

    async def change(self, link: LocalLink, request: Request, us_in: int) -> None:
        """Answer one subscribe, unsubscribe or unsubscribe_all request of ``link``."""
        if request.method.endswith("/unsubscribe_all"):
            await self._unsubscribe(link, None, sorted(link.channels))
            link.reply(request.id, "ok", us_in)
            return
        channels = _unique(get_channels(request.params))
        if request.method.endswith("/subscribe"):
            _check_allowed(link, request.method, channels)
            await self._subscribe(link, request, channels, us_in)
        else:
            removed = await self._unsubscribe(link, request.method, channels)
            link.reply(request.id, removed, us_in)

    def leave_all(self, link: LocalLink) -> None:
        """Take ``link`` off all its channels, in the background (it may be ending)."""
        channels = sorted(link.channels)
        link.channels.clear()
        if channels:
            self._gateway.spawn(self._leave, link, channels)

    async def _leave(self, link: LocalLink, channels: list[str]) -> None:
        # The lock may be held for as long as another link's subscribe waits on Deribit; the
        # wait is not bounded here, or the dead link would stay subscribed. _drop bounds the
        # upstream request itself.
        async with self._lock:
            await self._drop(link, channels, _unsubscribe_method(channels))

    async def _subscribe(
        self, link: LocalLink, request: Request, channels: list[str], us_in: int
    ) -> None:
        async with self._lock:
            new = [c for c in channels if c not in self._subscribers]
            answer: dict[str, Any] | None = None
            if new:
                answer = await self._upstream(request.method, new)
                if "error" in answer:
                    link.answer(request.id, answer)  # Deribit's refusal, passed through
                    return
                accepted = answer.get("result")
                for channel in accepted if isinstance(accepted, list) else ():
                    if isinstance(channel, str):
                        self._subscribers.setdefault(channel, set())
            granted = [c for c in channels if c in self._subscribers]
            for channel in granted:
                self._subscribers[channel].add(link)
                link.channels.add(channel)
        if answer is None:
            link.reply(request.id, granted, us_in)
        else:
            answer["result"] = granted
            link.answer(request.id, answer)

    async def _unsubscribe(
        self, link: LocalLink, method: str | None, channels: list[str]
    ) -> list[str]:
        """Take ``link`` off ``channels``; ``method`` None picks public or private by channel.

        The link's own record changes only under the lock, with the subscribers': a link that
        ends while it waits for the lock still has the channels, and leaving them at its end
        takes it off them.
        """
        async with self._lock:
            removed = [c for c in channels if c in link.channels]
            link.channels.difference_update(removed)
            await self._drop(link, removed, method or _unsubscribe_method(removed))
        return removed

    async def _drop(self, link: LocalLink, channels: list[str], method: str) -> None:
        """Take ``link`` off ``channels``; unsubscribe upstream those nobody wants any more.

        Called with the lock held. Deribit's answer to the upstream unsubscribe changes nothing
        for the link, so only its failure to arrive is noticed (the upstream is then gone, and
        its subscriptions with it).
        """
        emptied = []
        for channel in channels:
            links = self._subscribers.get(channel)
            if links is None:
                continue
            links.discard(link)
            if not links:
                del self._subscribers[channel]
                emptied.append(channel)
        if emptied and self._gateway.upstream_ready():
            # Shielded: the local record already says nobody wants these channels, so the
            # upstream must hear it too, even if the link asking ends meanwhile.
            with trio.move_on_after(self._gateway.request_timeout) as bounded:
                bounded.shield = True
                try:
                    await self._upstream(method, emptied)
                except RpcFault:
                    pass  # not ready: the upstream subscriptions ended with its connection

    async def _upstream(self, method: str, channels: list[str]) -> dict[str, Any]:
        """One subscribe or unsubscribe upstream, answered as Deribit answered it.

        Raises:
            RpcFault: 13028, the upstream is not ready or was lost meanwhile.
        """
        try:
            relayed = await self._gateway.relay(method, {"channels": channels})
            return await relayed.answer()
        except (NotReady, SessionLost):
            raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE) from None


def _unsubscribe_method(channels: list[str]) -> str:
    private = any(c.startswith(PRIVATE_PREFIX) for c in channels)
    return "private/unsubscribe" if private else "public/unsubscribe"
