"""Small decisions of the supervisor (pure): each worker's share of the
caps, and how long to wait before starting a worker that stopped."""

from __future__ import annotations

from dataclasses import dataclass


def cap_share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s share of a cap of ``total`` over ``workers``: the
    shares differ by one at most and add up to ``total`` exactly, so the cap
    holds in total as well as per process."""
    if not 0 <= index < workers:
        raise ValueError(f"worker {index} of {workers}")
    return total // workers + (1 if index < total % workers else 0)


@dataclass(slots=True)
class RestartBackoff:
    """A worker that stopped after running a while is started again at once;
    one that keeps stopping waits ``first``, doubling up to ``cap``, so a
    worker that crashes at start does not spin the CPU. A run of
    ``stable_after`` seconds clears the streak."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    stable_after: float = 60.0
    streak: int = 0
    """Exits in a row, each after a run shorter than ``stable_after``."""

    def delay_after(self, ran_for: float) -> float:
        """Seconds to wait before starting the worker again, after it ran ``ran_for`` seconds."""
        if ran_for >= self.stable_after:
            self.streak = 0
        delay = 0.0 if self.streak == 0 else min(self.cap, self.first * self.factor ** (self.streak - 1))
        self.streak += 1
        return delay
