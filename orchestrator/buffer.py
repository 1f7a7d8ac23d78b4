"""The bounded buffer between rollout production and learning in asynchronous mode.

Every item carries the policy version that produced it. The consumer asks with the learner's current
version and never gets an item more than `max_staleness` versions old: such items are dropped and
counted (DESIGN.md section 1), never silently trained on. Within the bound, `stale_policy: reweight`
hands each item out with a weight `staleness_decay ** staleness` for the loss to apply. Producers block
while the buffer is full, which bounds memory and staleness alike.

    buf: StalenessBuffer[Scored] = StalenessBuffer.from_config(cfg.pipeline)
    buf.put(rollouts.policy_version, Scored(rollouts, rewards))        # generation thread
    item = buf.get(current_version=learner_version, timeout=60.0)      # controller
    if item is not None: train(item.payload, weight=item.weight)

`AsyncProducer` is the thread that fills it in a run. Pure Python, thread-safe; no Ray inside.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeAlias, TypeVar

if TYPE_CHECKING:
    from actors.records import TrainBatch

T = TypeVar("T")
Produced: TypeAlias = "tuple[TrainBatch | None, dict[str, float]]"
"""One produced batch (None: nothing to train this round) and the metrics of producing it."""


class ProducerStopped(RuntimeError):
    """The producer thread failed (its error is the cause) or was stopped."""


@dataclass(kw_only=True, slots=True)
class AsyncConfig:
    """The recipe's `pipeline:` section: synchronous, or generation/scoring overlapping learning."""

    enabled: bool = False
    """Overlap rollout production (generate + score) with learner steps."""
    max_staleness: int = field(default=1, metadata={"ge": 0})
    """A batch produced by policy version v is trained on only while current_version - v <= this."""
    buffer_size: int = field(default=2, metadata={"ge": 1})
    """Batches produced ahead of the learner at most (producers wait while it is full)."""
    stale_policy: Literal["drop", "reweight"] = "drop"
    """Within the bound, drop: every item weighs 1; reweight: an item s versions old weighs
    staleness_decay**s. Beyond the bound items are always dropped."""
    staleness_decay: float = field(default=0.5, metadata={"gt": 0.0, "le": 1.0})


@dataclass(kw_only=True, slots=True)
class Delivered(Generic[T]):
    """An item as the consumer gets it."""

    version: int
    """Policy version that produced the payload."""
    staleness: int
    """current_version - version at delivery; never above max_staleness."""
    weight: float
    """1.0, or staleness_decay**staleness under stale_policy: reweight."""
    payload: T


@dataclass(kw_only=True, slots=True)
class BufferState(Generic[T]):
    """What a checkpoint records about the buffer: counters, and the undelivered items or the fact that
    they were discarded (`items` empty, `undelivered` > 0, `items_saved` False)."""

    produced: int
    delivered: int
    dropped_stale: int
    discarded: int
    """Items thrown away without delivery (close, or a checkpoint that did not keep them)."""
    undelivered: int
    items_saved: bool
    items: list[tuple[int, T]] = field(default_factory=list)
    """(version, payload) in production order, when saved."""


class StalenessBuffer(Generic[T]):
    """Thread-safe bounded FIFO of versioned items with a staleness bound on the consumer side."""

    def __init__(
        self,
        capacity: int,
        max_staleness: int,
        *,
        stale_policy: Literal["drop", "reweight"] = "drop",
        staleness_decay: float = 0.5,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"buffer_size: must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {max_staleness}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.stale_policy = stale_policy
        self.staleness_decay = staleness_decay
        self._items: deque[tuple[int, T]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._floor = -(2**62)
        """Oldest version still acceptable: current_version - max_staleness of the newest consumer call."""
        self.produced = 0
        self.delivered = 0
        self.dropped_stale = 0
        self.discarded = 0

    @classmethod
    def from_config(cls, cfg: AsyncConfig) -> StalenessBuffer[T]:
        return cls(
            cfg.buffer_size,
            cfg.max_staleness,
            stale_policy=cfg.stale_policy,
            staleness_decay=cfg.staleness_decay,
        )

    def put(self, version: int, payload: T, timeout: float | None = None) -> bool:
        """Add an item; blocks while full. False when closed or timed out before it could be added.
        An item already too stale for the newest consumer is dropped and counted (True: it was taken)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closed or len(self._items) < self.capacity, timeout)
            if self._closed or not ok:
                return False
            self.produced += 1
            if version < self._floor:
                self.dropped_stale += 1
            else:
                self._items.append((version, payload))
                self._cond.notify_all()
            return True

    def advance(self, current_version: int) -> int:
        """The learner reached `current_version`: drop what is now too stale (freeing room for producers).
        Returns how many were dropped."""
        with self._cond:
            return self._advance(current_version)

    def _advance(self, current_version: int) -> int:
        self._floor = max(self._floor, current_version - self.max_staleness)
        kept = deque(item for item in self._items if item[0] >= self._floor)
        dropped = len(self._items) - len(kept)
        if dropped:
            self._items = kept
            self.dropped_stale += dropped
            self._cond.notify_all()
        return dropped

    def get(self, current_version: int, timeout: float | None = None) -> Delivered[T] | None:
        """The oldest item within the staleness bound (too-stale ones are dropped on the way); None when
        closed and empty, or when nothing fresh enough arrived within `timeout`."""

        def ready() -> bool:  # re-checked on every wake-up: items may have gone stale meanwhile
            self._advance(current_version)
            return self._closed or bool(self._items)

        with self._cond:
            if not self._cond.wait_for(ready, timeout) or not self._items:
                return None
            version, payload = self._items.popleft()
            self.delivered += 1
            self._cond.notify_all()
        staleness = current_version - version
        weight = self.staleness_decay**staleness if self.stale_policy == "reweight" else 1.0
        return Delivered(version=version, staleness=max(staleness, 0), weight=weight, payload=payload)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def state(self, *, keep_items: bool) -> BufferState[T]:
        """Checkpoint view. With keep_items False the undelivered items are recorded as discarded (a run
        resumed from this checkpoint will not see them); the live buffer keeps them either way."""
        with self._cond:
            items = list(self._items)
            return BufferState(
                produced=self.produced,
                delivered=self.delivered,
                dropped_stale=self.dropped_stale,
                discarded=self.discarded + (0 if keep_items else len(items)),
                undelivered=len(items),
                items_saved=keep_items,
                items=items if keep_items else [],
            )

    def load_state(self, state: BufferState[T]) -> None:
        """Restore counters and, when they were saved, the undelivered items (beyond capacity they are
        kept: refusing them would lose rollouts the checkpoint promised)."""
        with self._cond:
            self.produced = state.produced
            self.delivered = state.delivered
            self.dropped_stale = state.dropped_stale
            self.discarded = state.discarded
            self._items = deque(state.items)
            self._cond.notify_all()

    def close(self) -> int:
        """Stop producers and consumers; returns how many undelivered items were discarded."""
        with self._cond:
            self._closed = True
            n = len(self._items)
            self.discarded += n
            self._items.clear()
            self._cond.notify_all()
            return n


class AsyncProducer:
    """Asynchronous mode: a thread produces rollout batches (generate, score, select) into a bounded
    buffer while the learner trains. Every batch carries the policy version that sampled it, and the
    buffer never hands out one older than `pipeline.max_staleness` versions (those are dropped, counted).
    Weight sync takes the generator pool's lock, so a group is never sampled with two versions."""

    def __init__(
        self, make_batch: Callable[[], Produced], version: Callable[[], int], cfg: AsyncConfig
    ) -> None:
        """`make_batch` produces one batch (the controller's generate, score, select); `version` is the
        generators' policy version, which an empty batch is filed under."""
        self._make_batch, self._version = make_batch, version
        self.buffer: StalenessBuffer[Produced] = StalenessBuffer.from_config(cfg)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rollout-producer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                version = self._version()
                batch, metrics = self._make_batch()
                if not self.buffer.put(batch.policy_version if batch else version, (batch, metrics)):
                    return
        except BaseException as exc:  # surfaced to the learner loop by next_batch
            self.error = exc
            self.buffer.close()

    def next_batch(self, current_version: int) -> Produced:
        item = self.buffer.get(current_version)
        if item is None:
            raise ProducerStopped(f"rollout producer stopped: {self.error!r}") from self.error
        batch, metrics = item.payload
        if batch is not None and item.weight != 1.0 and batch.advantages is not None:
            batch.advantages = batch.advantages * item.weight  # stale_policy: reweight
        return batch, {
            **metrics,
            "staleness": float(item.staleness),
            "queue_depth": float(len(self.buffer)),
            "stale_dropped": float(self.buffer.state(keep_items=False).dropped_stale),
        }

    def stop(self) -> int:
        """Stop producing; returns how many batches were dropped as too stale over the run."""
        self._stop.set()
        dropped = self.buffer.state(keep_items=False).dropped_stale
        self.buffer.close()
        self._thread.join(timeout=300)
        return dropped


__all__ = ["AsyncConfig", "AsyncProducer", "BufferState", "Delivered", "ProducerStopped", "StalenessBuffer"]
