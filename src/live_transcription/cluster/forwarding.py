"""Talk commands sent to the replica that owns the room, over NATS request/reply.

Each replica serves ``<prefix>.replica.<id>.command``. The server side
answers every request: a malformed one gets 400, one past the in-flight cap
gets 503 at once (counted), a handler failure gets 500. The client side
returns the owner's ``Reply``, or a ``ForwardFailure`` saying why there is
none (no replica listens on the subject, the owner did not answer in time,
the answer was unreadable, NATS is down).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from live_transcription.cluster import codec
from live_transcription.cluster.codec import Forwarded, Reply
from live_transcription.cluster.store import NATS_FAILURES

log = logging.getLogger(__name__)

PENDING_LIMIT = 1024
"""Requests queued in the client library before it drops them (a slow-consumer
error; the sender times out). The in-flight cap answers far earlier."""

Handler = Callable[[Forwarded], Awaitable[Reply]]


def command_subject(prefix: str, replica_id: str) -> str:
    return f"{prefix}.replica.{replica_id}.command"


class FailureKind(enum.Enum):
    NO_RESPONDERS = "no-responders"
    TIMEOUT = "timeout"
    BAD_REPLY = "bad-reply"
    UNAVAILABLE = "nats-unavailable"


@dataclass(frozen=True, slots=True)
class ForwardFailure:
    kind: FailureKind
    detail: str = ""


class CommandServer:
    """Serves forwarded commands; run ``run()`` as a task of a TaskGroup."""

    def __init__(self, nc: Client, subject: str, handler: Handler, *, max_inflight: int) -> None:
        self._nc = nc
        self.subject = subject
        self._handler = handler
        self._max_inflight = max_inflight
        self._inflight = 0
        self.ready = asyncio.Event()
        self.served = 0
        self.rejected_busy = 0
        self.rejected_malformed = 0

    async def run(self) -> None:
        sub = await self._nc.subscribe(self.subject, pending_msgs_limit=PENDING_LIMIT)
        try:
            await self._nc.flush()
            self.ready.set()
            async with asyncio.TaskGroup() as tasks:
                async for msg in sub.messages:
                    parsed = codec.parse_command(msg.data)
                    if isinstance(parsed, codec.CodecError):
                        self.rejected_malformed += 1
                        log.warning("malformed forwarded command refused: %s", parsed)
                        await self._respond(msg, Reply.error(400, f"malformed command: {parsed}"))
                    elif self._inflight >= self._max_inflight:
                        self.rejected_busy += 1
                        await self._respond(msg, Reply.error(503, "replica busy; retry"))
                    else:
                        self._inflight += 1
                        tasks.create_task(self._serve(msg, parsed))
        finally:
            self.ready.clear()
            if not self._nc.is_closed:
                try:
                    await sub.unsubscribe()
                except NATS_FAILURES as exc:
                    log.debug("unsubscribing %s failed: %s", self.subject, exc)

    async def _serve(self, msg: Msg, forwarded: Forwarded) -> None:
        try:
            reply = await self._handler(forwarded)
        except Exception:
            log.exception("forwarded %s failed", type(forwarded.command).__name__)
            reply = Reply.error(500, "the owning replica failed to execute the command")
        finally:
            self._inflight -= 1
        self.served += 1
        await self._respond(msg, reply)

    @staticmethod
    async def _respond(msg: Msg, reply: Reply) -> None:
        if not msg.reply:
            return
        try:
            await msg.respond(codec.encode_reply(reply))
        except NATS_FAILURES as exc:
            log.warning("could not answer a forwarded command: %s", exc or type(exc).__name__)


async def forward(
    nc: Client, subject: str, forwarded: Forwarded, *, deadline: float
) -> Reply | ForwardFailure:
    """Send a command to its owner and return the owner's reply (or why there
    is none after ``deadline`` seconds)."""
    timeout = deadline
    try:
        msg = await nc.request(subject, codec.encode_command(forwarded), timeout=timeout)
    except nats.errors.NoRespondersError:
        return ForwardFailure(FailureKind.NO_RESPONDERS, subject)
    except TimeoutError:  # nats.errors.TimeoutError is one
        return ForwardFailure(FailureKind.TIMEOUT, f"no answer within {timeout:.1f} s")
    except NATS_FAILURES as exc:
        return ForwardFailure(FailureKind.UNAVAILABLE, str(exc) or type(exc).__name__)
    reply = codec.parse_reply(msg.data)
    if isinstance(reply, codec.CodecError):
        return ForwardFailure(FailureKind.BAD_REPLY, str(reply))
    return reply
