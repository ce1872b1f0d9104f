"""One end of a worker's channel (a Unix stream socket): messages in and out.

``send`` writes at once and never waits (what the socket cannot take yet
waits in the transport's buffer); every sender bounds what it puts there:
the supervisor by its cap on requests in flight per worker, the worker by
answering only those, by coalescing its rooms' records, and by skipping
load reports while the buffer is above ``high_water``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from live_transcription.workers import protocol
from live_transcription.workers.protocol import FrameDecoder, Message, ProtocolError

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
HIGH_WATER = 1024 * 1024
"""Bytes waiting in the transport above which a sender holds back what can wait."""


class Channel:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, high_water: int = HIGH_WATER
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._high_water = high_water
        self.sent = 0
        self.unsent = 0
        """Messages not sent because the channel was closed."""

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()

    @property
    def backed_up(self) -> bool:
        """More than ``high_water`` bytes are waiting for the peer to read them."""
        return self._writer.transport.get_write_buffer_size() > self._high_water

    def send(self, message: Message) -> bool:
        """Queue ``message`` on the socket; False when the channel is closed."""
        if self._writer.is_closing():
            self.unsent += 1
            return False
        self._writer.write(protocol.encode(message))
        self.sent += 1
        return True

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its limit (or the channel closed)."""
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def messages(self) -> AsyncIterator[Message | ProtocolError]:
        """Messages as they arrive, until the peer closes the channel. An
        unreadable frame is yielded as its error; a stream that cannot be cut
        into frames any more ends with its error."""
        decoder = FrameDecoder()
        while True:
            try:
                data = await self._reader.read(READ_CHUNK)
            except ConnectionError:
                return
            if not data:
                return
            for frame in decoder.feed(data):
                yield protocol.parse(frame)
            if decoder.error is not None:
                yield decoder.error
                return

    def close(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
