"""A bounded FIFO of audio frames: full means the oldest frame goes, counted.

Audio is the one place where dropping is right: a late frame is worth less
than a fresh one, and waiting would back pressure into the RTP receive path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestRing(Generic[T]):
    """FIFO with a hard capacity; ``push`` on a full ring evicts the oldest item
    and increments ``dropped``. Single owner, no locking."""

    __slots__ = ("_items", "dropped")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._items: deque[T] = deque(maxlen=capacity)
        self.dropped = 0

    @property
    def capacity(self) -> int:
        maxlen = self._items.maxlen
        assert maxlen is not None
        return maxlen

    def push(self, item: T) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)

    def pop(self) -> T:
        """The oldest item; IndexError when empty."""
        return self._items.popleft()

    def drain(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        return items

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)
