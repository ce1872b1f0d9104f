"""The signaling half that both load generators' media bridges share.

The HPB emulator asks a ``MediaBridge`` for offers, hands it answers and
closes subscriptions; how the media is then sent (aiortc's sender or the
lean generator's own packets) is the subclass's business (``_release``).
One owner: the load generator's loop.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Generic, Protocol, TypeVar

from aiortc import RTCPeerConnection, RTCSessionDescription

log = logging.getLogger("bench.loadgen")


class SubscriptionLike(Protocol):
    @property
    def sid(self) -> str: ...
    @property
    def subscriber(self) -> str: ...
    @property
    def publisher(self) -> str: ...
    @property
    def pc(self) -> RTCPeerConnection: ...


S = TypeVar("S", bound=SubscriptionLike)


class SubscriptionBook(Generic[S]):
    """Subscriptions by id and by publisher, the answer step and closing."""

    def __init__(self) -> None:
        self._subscriptions: dict[str, S] = {}
        self._by_publisher: dict[str, S] = {}
        self.candidates_ignored = 0
        self.stale_answers = 0
        self.bad_answers = 0
        self.offers = 0
        self.closed = 0

    def _add(self, sub: S) -> None:
        self._subscriptions[sub.sid] = sub
        self._by_publisher[sub.publisher] = sub
        self.offers += 1

    def _find(self, subscriber: str, publisher: str, sid: str) -> S:
        sub = self._subscriptions.get(sid)
        if sub is None or sub.subscriber != subscriber or sub.publisher != publisher:
            raise LookupError(f"no subscription {sid} of {subscriber} to {publisher}")
        return sub

    async def _close_earlier(self, subscriber: str, publisher: str) -> None:
        """A new offer replaces the subscriber's earlier one to the same publisher."""
        for old in [
            s for s in self._subscriptions.values() if s.subscriber == subscriber and s.publisher == publisher
        ]:
            await self._close(old)

    async def answer(self, subscriber: str, publisher: str, sid: str, sdp: str) -> None:
        try:
            sub = self._find(subscriber, publisher, sid)
        except LookupError:
            # the publisher left or a newer offer replaced this one: an SFU
            # answers with an error, it does not drop the signaling connection
            self.stale_answers += 1
            return
        try:
            await sub.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
        except Exception as exc:
            self.bad_answers += 1
            log.warning("answer for %s refused: %r", sid, exc)

    async def candidate(
        self, subscriber: str, publisher: str, sid: str, candidate: dict[str, object]
    ) -> None:
        # aiortc puts all its candidates into the answer SDP already; the
        # trickled copies add nothing on loopback
        self.candidates_ignored += 1

    async def close_subscriber(self, subscriber: str) -> None:
        for sub in [s for s in self._subscriptions.values() if s.subscriber == subscriber]:
            await self._close(sub)

    async def _close_publisher(self, publisher: str) -> None:
        for sub in [s for s in self._subscriptions.values() if s.publisher == publisher]:
            await self._close(sub)

    async def _close(self, sub: S) -> None:
        self._subscriptions.pop(sub.sid, None)
        if self._by_publisher.get(sub.publisher) is sub:
            del self._by_publisher[sub.publisher]
        self.closed += 1
        self._release(sub)
        with contextlib.suppress(Exception):
            await sub.pc.close()

    def _release(self, sub: S) -> None:
        """Stop sending ``sub``'s media (before its peer connection closes)."""

    async def aclose(self) -> None:
        for sub in list(self._subscriptions.values()):
            await self._close(sub)
