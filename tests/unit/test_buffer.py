"""The async staleness buffer: never hands out a too-stale item, counts every drop, blocks when full,
reweights within the bound, and checkpoints its undelivered items (or records that they were discarded)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from actors.records import TrainBatch
from orchestrator.buffer import AsyncConfig, AsyncProducer, ProducerStopped, StalenessBuffer
from orchestrator.schema import ConfigError, from_dict


def test_too_stale_items_are_dropped_and_counted_never_delivered() -> None:
    buf: StalenessBuffer[str] = StalenessBuffer(capacity=8, max_staleness=1)
    for v in (0, 1, 2, 3):
        assert buf.put(v, f"v{v}")
    item = buf.get(current_version=3)
    assert item is not None and (item.version, item.staleness, item.payload) == (2, 1, "v2")
    assert buf.dropped_stale == 2 and buf.delivered == 1 and len(buf) == 1
    # the learner moves on before the last one is consumed: it goes too
    assert buf.advance(5) == 1 and len(buf) == 0 and buf.dropped_stale == 3
    # a producer finishing late with an old version: taken, dropped, counted
    assert buf.put(3, "late") and len(buf) == 0 and buf.dropped_stale == 4
    assert buf.get(current_version=5, timeout=0.01) is None


def test_reweight_policy_weighs_items_by_staleness() -> None:
    cfg = AsyncConfig(
        enabled=True, max_staleness=2, buffer_size=4, stale_policy="reweight", staleness_decay=0.5
    )
    buf: StalenessBuffer[int] = StalenessBuffer.from_config(cfg)
    for v in (4, 5, 6):
        buf.put(v, v)
    got = [buf.get(current_version=6) for _ in range(3)]
    assert [(g.staleness, g.weight) for g in got if g] == [(2, 0.25), (1, 0.5), (0, 1.0)]
    drop: StalenessBuffer[int] = StalenessBuffer(4, 2)
    drop.put(4, 4)
    first = drop.get(6)
    assert first is not None and first.weight == 1.0


def test_put_blocks_while_full_and_get_waits_for_fresh_items() -> None:
    buf: StalenessBuffer[int] = StalenessBuffer(capacity=1, max_staleness=0)
    assert buf.put(0, 0)
    assert not buf.put(0, 1, timeout=0.05)  # full
    t0 = time.perf_counter()
    threading.Timer(0.1, lambda: buf.put(1, 1)).start()  # blocked until the get below frees room
    item = buf.get(current_version=1, timeout=5.0)  # drops v0 (stale), frees room, waits for v1
    assert item is not None and item.version == 1 and buf.dropped_stale == 1
    assert time.perf_counter() - t0 >= 0.09
    threading.Timer(0.05, buf.close).start()
    assert buf.get(current_version=1, timeout=5.0) is None  # close wakes a waiting consumer


def test_concurrent_producers_never_deliver_stale_and_every_item_is_accounted() -> None:
    rng = random.Random(0)
    buf: StalenessBuffer[int] = StalenessBuffer(capacity=3, max_staleness=2)
    version = [0]
    stop = threading.Event()

    def produce(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            # a producer samples with the weights it last loaded: sometimes several versions behind
            buf.put(max(0, version[0] - r.randint(0, 4)), seed, timeout=0.01)

    threads = [threading.Thread(target=produce, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    delivered = []
    for _ in range(300):
        item = buf.get(current_version=version[0], timeout=1.0)
        assert item is not None
        delivered.append(item)
        if rng.random() < 0.3:
            version[0] += 1
    stop.set()
    for t in threads:
        t.join()
    assert max(d.staleness for d in delivered) <= 2 and version[0] > 50
    assert buf.dropped_stale > 0  # the workload did produce stale items
    assert buf.produced == buf.delivered + buf.dropped_stale + len(buf)


def test_state_keeps_undelivered_items_or_records_their_loss() -> None:
    buf: StalenessBuffer[str] = StalenessBuffer(capacity=4, max_staleness=1)
    for v, p in ((3, "a"), (4, "b"), (4, "c")):
        buf.put(v, p)
    assert buf.get(4) is not None
    kept = buf.state(keep_items=True)
    assert kept.items == [(4, "b"), (4, "c")] and kept.undelivered == 2 and kept.discarded == 0
    lost = buf.state(keep_items=False)
    assert lost.items == [] and lost.undelivered == 2 and lost.discarded == 2 and not lost.items_saved
    assert len(buf) == 2  # taking a checkpoint does not consume the live buffer

    resumed: StalenessBuffer[str] = StalenessBuffer(capacity=4, max_staleness=1)
    resumed.load_state(kept)
    got = resumed.get(5)
    assert got is not None and got.payload == "b" and resumed.delivered == 2
    fresh: StalenessBuffer[str] = StalenessBuffer(capacity=4, max_staleness=1)
    fresh.load_state(lost)
    assert len(fresh) == 0 and fresh.discarded == 2 and fresh.produced == 3
    assert buf.close() == 2 and buf.discarded == 2 and not buf.put(9, "x")


def test_async_config_is_strict() -> None:
    with pytest.raises(ConfigError, match=r"^pipeline.stale_policy:"):
        from_dict(AsyncConfig, {"stale_policy": "ignore"}, "pipeline")
    with pytest.raises(ConfigError, match=r"^pipeline.max_staleness: must be >= 0"):
        from_dict(AsyncConfig, {"max_staleness": -1}, "pipeline")


def _nft_batch(version: int) -> TrainBatch:
    return TrainBatch(
        kind="nft", policy_version=version, x0=torch.zeros(2, 1, 1, 1), text=torch.zeros(2, 1, 1),
        text_mask=torch.ones(2, 1, dtype=torch.bool), advantages=torch.ones(2),
    )  # fmt: skip


def test_producer_hands_out_batches_in_order_with_staleness_and_reweights_stale_ones() -> None:
    """The producer runs ahead of the learner by the buffer's size; a batch one version old under
    `reweight` has its advantages scaled by staleness_decay."""
    made = iter(range(100))
    version = [0]

    def make() -> tuple[TrainBatch | None, dict[str, float]]:
        i = next(made)
        return _nft_batch(version[0]), {"made": float(i)}

    cfg = AsyncConfig(
        enabled=True, max_staleness=1, buffer_size=2, stale_policy="reweight", staleness_decay=0.5
    )
    producer = AsyncProducer(make, lambda: version[0], cfg)
    try:
        batch, metrics = producer.next_batch(0)
        assert batch is not None and metrics["made"] == 0 and metrics["staleness"] == 0
        assert torch.equal(batch.advantages, torch.ones(2))  # type: ignore[arg-type]
        version[0] = 1  # the learner stepped and synced: batches made from now on are version 1
        batch, metrics = producer.next_batch(1)  # made before the sync: one version old
        assert batch is not None and batch.policy_version == 0 and metrics["staleness"] == 1
        assert torch.equal(batch.advantages, torch.full((2,), 0.5))  # type: ignore[arg-type]
    finally:
        assert producer.stop() == 0


def test_producer_error_surfaces_as_producer_stopped_with_its_cause() -> None:
    def make() -> tuple[TrainBatch | None, dict[str, float]]:
        raise ValueError("reward service said no")

    producer = AsyncProducer(make, lambda: 0, AsyncConfig(enabled=True))
    with pytest.raises(ProducerStopped, match="reward service said no") as info:
        producer.next_batch(0)
    assert isinstance(info.value.__cause__, ValueError)
    producer.stop()


def test_producer_stop_ends_its_thread_and_counts_stale_drops() -> None:
    """Batches made by versions the learner has left behind by more than max_staleness are dropped and
    counted, never handed out; stop() joins the thread even while it waits on a full buffer."""
    producer = AsyncProducer(lambda: (_nft_batch(0), {}), lambda: 0, AsyncConfig(enabled=True, buffer_size=2))
    deadline = time.monotonic() + 10
    while len(producer.buffer) < 2 and time.monotonic() < deadline:  # full: the thread waits in put
        time.sleep(0.01)
    producer.buffer.advance(5)  # version 0 is now 5 versions old, past max_staleness=1
    assert producer.stop() >= 2
    assert not producer._thread.is_alive()
