"""`JanusBridge`: the HPB emulator's media side, backed by a real Janus.

The emulator calls it as a `MediaBridge` (session ids are HPB session ids):
`request_offer` subscribes a session to a publisher's feed and returns
Janus' offer, `answer` starts that subscription, `candidate` trickles,
`close_subscriber` detaches every subscription of a session. Publishers
are added with `add_publisher` (a WAV file played into one VideoRoom room).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .janus import JanusClient, JanusClosed, JanusError, JanusHandle
from .publisher import Publisher, create_room

log = logging.getLogger(__name__)

# VideoRoom error codes meaning "there is no such feed (any more)".
NO_SUCH_FEED_CODES = frozenset({428, 435})


@dataclass(slots=True)
class Subscription:
    sid: str
    subscriber: str
    publisher: str
    handle: JanusHandle


class JanusBridge:
    """`async with JanusBridge(janus.ws_url) as bridge:` -> one room on one Janus session."""

    def __init__(self, ws_url: str, *, max_publishers: int = 100) -> None:
        self._client = JanusClient(ws_url)
        self._max_publishers = max_publishers
        self._control: JanusHandle | None = None
        self.room = 0
        self._publishers: dict[str, Publisher] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._sids = (f"janus-sub-{n}" for n in itertools.count(1))

    @property
    def client(self) -> JanusClient:
        return self._client

    @property
    def publishers(self) -> Mapping[str, Publisher]:
        return self._publishers

    @property
    def subscriptions(self) -> Mapping[str, Subscription]:
        return self._subscriptions

    async def __aenter__(self) -> JanusBridge:
        await self._client.__aenter__()
        try:
            self._control = await self._client.attach()
            self.room = await create_room(self._control, max_publishers=self._max_publishers)
        except BaseException as exc:
            await self._client.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for subscriber in {s.subscriber for s in self._subscriptions.values()}:
                await self.close_subscriber(subscriber)
            for session_id in list(self._publishers):
                await self.remove_publisher(session_id)
        finally:
            await self._client.__aexit__(exc_type, exc, tb)

    # -- publishers

    async def add_publisher(
        self,
        session_id: str,
        wav: Path,
        *,
        loop: bool = False,
        start_delay_s: float = 0.0,
        autoplay: bool = True,
    ) -> Publisher:
        """Publish `wav` as HPB session `session_id`; returns once Janus has the media."""
        if session_id in self._publishers:
            raise ValueError(f"session {session_id} already publishes")
        publisher = Publisher(
            self._client,
            self.room,
            wav,
            display=session_id,
            loop=loop,
            start_delay_s=start_delay_s,
            autoplay=autoplay,
        )
        await publisher.__aenter__()
        self._publishers[session_id] = publisher
        return publisher

    async def remove_publisher(self, session_id: str) -> None:
        publisher = self._publishers.pop(session_id, None)
        if publisher is not None:
            await publisher.stop()

    async def list_participants(self) -> list[dict[str, object]]:
        """Janus' own view of the room's participants (publishers)."""
        if self._control is None:
            raise JanusClosed("bridge is not started")
        reply = await self._control.message({"request": "listparticipants", "room": self.room})
        participants = reply.data.get("participants", [])
        return [p for p in participants if isinstance(p, dict)]

    # -- MediaBridge

    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        source = self._publishers.get(publisher)
        if source is None or not source.feed_id:
            raise LookupError(f"session {publisher} publishes no media")
        # A new request for the same pair replaces the old subscription.
        for old in [
            s for s in self._subscriptions.values() if s.subscriber == subscriber and s.publisher == publisher
        ]:
            await self._close(old)
        handle = await self._client.attach()
        try:
            reply = await handle.message(
                {
                    "request": "join",
                    "room": self.room,
                    "ptype": "subscriber",
                    "streams": [{"feed": source.feed_id}],
                }
            )
        except JanusError as exc:
            await self._detach(handle)
            if exc.code in NO_SUCH_FEED_CODES:
                raise LookupError(f"session {publisher} publishes no media: {exc.reason}") from exc
            raise
        except BaseException:
            await self._detach(handle)
            raise
        if reply.jsep is None or reply.jsep.get("type") != "offer":
            await self._detach(handle)
            raise JanusError(0, f"subscriber join answered without an offer: {reply.data}")
        sid = next(self._sids)
        self._subscriptions[sid] = Subscription(sid, subscriber, publisher, handle)
        return sid, str(reply.jsep["sdp"])

    def _find(self, subscriber: str, publisher: str, sid: str) -> Subscription:
        sub = self._subscriptions.get(sid)
        if sub is None or sub.subscriber != subscriber or sub.publisher != publisher:
            raise LookupError(f"no subscription {sid} of {subscriber} to {publisher}")
        return sub

    async def answer(self, subscriber: str, publisher: str, sid: str, sdp: str) -> None:
        sub = self._find(subscriber, publisher, sid)
        await sub.handle.message({"request": "start"}, jsep={"type": "answer", "sdp": sdp})

    async def candidate(
        self, subscriber: str, publisher: str, sid: str, candidate: dict[str, object]
    ) -> None:
        sub = self._find(subscriber, publisher, sid)
        if candidate.get("completed") is True or not candidate.get("candidate"):
            await sub.handle.trickle({"completed": True})
        else:
            await sub.handle.trickle(candidate)

    async def close_subscriber(self, subscriber: str) -> None:
        for sub in [s for s in self._subscriptions.values() if s.subscriber == subscriber]:
            await self._close(sub)

    async def _close(self, sub: Subscription) -> None:
        self._subscriptions.pop(sub.sid, None)
        await self._detach(sub.handle)

    async def _detach(self, handle: JanusHandle) -> None:
        with contextlib.suppress(JanusError, JanusClosed, TimeoutError):
            await handle.detach()
