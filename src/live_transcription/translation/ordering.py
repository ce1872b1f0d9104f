"""Release results in the order their requests were made, per stream (pure).

A stream is one speaker's captions in one target language: listeners must
read that speaker's finals in the order spoken, whatever order the
translations finish in. Every request resolves exactly once (a translation,
or a drop when it failed or ran past its time bound), so a stream never
waits forever on its head.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

_PENDING = object()


class InOrder(Generic[K, T]):
    __slots__ = ("_next", "_streams")

    def __init__(self) -> None:
        self._streams: dict[K, deque[list[object]]] = {}
        self._next = 0

    def add(self, stream: K) -> int:
        """Reserve the next place in ``stream``; returns its ticket."""
        ticket = self._next
        self._next += 1
        self._streams.setdefault(stream, deque()).append([ticket, _PENDING])
        return ticket

    def resolve(self, stream: K, ticket: int, result: T) -> list[T]:
        """Record ``ticket``'s result; returns the results now due, in order
        (empty while an earlier one is still pending)."""
        queue = self._streams.get(stream)
        if queue is None:
            return []
        for entry in queue:
            if entry[0] == ticket:
                entry[1] = result
                break
        else:
            return []
        due: list[T] = []
        while queue and queue[0][1] is not _PENDING:
            due.append(queue.popleft()[1])  # type: ignore[arg-type]
        if not queue:
            del self._streams[stream]
        return due

    def pending(self, stream: K | None = None) -> int:
        if stream is not None:
            return len(self._streams.get(stream, ()))
        return sum(len(queue) for queue in self._streams.values())

    def held_back(self) -> int:
        """Results known but waiting for an earlier one of their stream."""
        return sum(1 for queue in self._streams.values() for entry in queue if entry[1] is not _PENDING)
