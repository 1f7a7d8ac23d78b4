"""The bounded buffer between rollout production and learning in asynchronous mode.

Every item carries the policy version that produced it. `get(current_version)` never returns an item
older than `max_staleness` versions: such items are dropped and counted (DESIGN.md section 1), never
silently trained on. Producers block when the buffer is full, which bounds memory and staleness alike.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(kw_only=True, slots=True)
class AsyncConfig:
    """The recipe's `pipeline:` section: synchronous, or generation/scoring overlapping learning."""

    enabled: bool = False
    """Overlap rollout production (generate + score) with learner steps."""
    max_staleness: int = field(default=1, metadata={"ge": 0})
    """A batch produced by policy version v is trained on only while current_version - v <= this."""
    buffer_size: int = field(default=2, metadata={"ge": 1})
    """Batches produced ahead of the learner at most."""


@dataclass(kw_only=True, slots=True)
class Item(Generic[T]):
    version: int
    payload: T


class StalenessBuffer(Generic[T]):
    """Thread-safe FIFO of versioned items with a staleness bound on the consumer side."""

    def __init__(self, capacity: int, max_staleness: int) -> None:
        self.capacity = capacity
        self.max_staleness = max_staleness
        self._items: deque[Item[T]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.delivered = 0

    def put(self, version: int, payload: T, timeout: float | None = None) -> bool:
        """Add an item; blocks while full. False when closed (or timed out) before it could be added."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closed or len(self._items) < self.capacity, timeout)
            if self._closed or not ok:
                return False
            self._items.append(Item(version=version, payload=payload))
            self._cond.notify_all()
            return True

    def get(self, current_version: int, timeout: float | None = None) -> tuple[int, T] | None:
        """The oldest item within the staleness bound (too-stale ones are dropped on the way)."""
        with self._cond:
            while True:
                while self._items and current_version - self._items[0].version > self.max_staleness:
                    self._items.popleft()
                    self.dropped += 1
                    self._cond.notify_all()
                if self._items:
                    item = self._items.popleft()
                    self.delivered += 1
                    self._cond.notify_all()
                    return item.version, item.payload
                if self._closed or not self._cond.wait(timeout):
                    return None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> int:
        """Stop producers and consumers; returns how many undelivered items were discarded."""
        with self._cond:
            self._closed = True
            n = len(self._items)
            self._items.clear()
            self._cond.notify_all()
            return n
