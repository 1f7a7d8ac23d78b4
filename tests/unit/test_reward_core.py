"""The transport-free data plane: dynamic batching, the bounded queue, deadlines, scorer failures."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from rewards.base import ScoreBatch, ScorerInfo
from rewards.core import DeadlineExpired, QueueFull, ScoreInput, ScoringCore, ShuttingDown


class MeanModel:
    """Score = mean pixel / 255; prompt 'nan' gives NaN, 'boom' raises; records each batch's size."""

    def __init__(self, delay: float = 0.0, max_batch: int = 64) -> None:
        self.delay, self.max_batch = delay, max_batch
        self.sizes: list[int] = []
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def info(self) -> ScorerInfo:
        return ScorerInfo(name="mean", version="1", heads=["mean"], max_batch=self.max_batch)

    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        self.gate.wait(5)
        time.sleep(self.delay)
        self.sizes.append(len(images))
        self.threads.append(threading.current_thread().name)
        if "boom" in prompts:
            raise RuntimeError("weights exploded")
        values = images.reshape(len(images), -1).mean(1).astype(np.float32) / 255
        values[[p == "nan" for p in prompts]] = np.nan
        return ScoreBatch(scores={"mean": values})


def _inp(n: int, value: int, size: int = 4, prompt: str = "p") -> ScoreInput:
    return ScoreInput(
        images=np.full((n, size, size, 3), value, np.uint8),
        prompts=[prompt] * n,
        item_ids=[str(i) for i in range(n)],
    )


def _core(model: MeanModel, **kw: float) -> ScoringCore:
    args = {"max_batch": 16, "max_wait_s": 0.05, "queue_size": 32, **kw}
    return ScoringCore(model, **args)  # type: ignore[arg-type]


def test_concurrent_requests_are_coalesced_and_answered_with_their_own_scores() -> None:
    async def main() -> None:
        model = MeanModel()
        core = _core(model)
        await core.start()
        results = await asyncio.gather(*(core.score(_inp(2, v)) for v in range(10, 90, 10)))
        for v, batch in zip(range(10, 90, 10), results):
            np.testing.assert_allclose(batch.scores["mean"], [v / 255] * 2, rtol=1e-6)
        assert core.stats.coalesced >= 1 and core.stats.largest > 2, core.stats
        assert sum(model.sizes) == 16 and max(model.sizes) <= 16
        await core.close()

    asyncio.run(main())


def test_batches_stay_within_max_batch_and_split_big_requests() -> None:
    async def main() -> None:
        model = MeanModel(max_batch=4)
        core = _core(model, max_batch=8)  # the scorer's max (4) wins
        await core.start()
        batch = await core.score(_inp(10, 51))
        np.testing.assert_allclose(batch.scores["mean"], [0.2] * 10, rtol=1e-6)
        assert model.sizes == [4, 4, 2] and core.info.max_batch == 4
        await core.close()

    asyncio.run(main())


def test_shapes_do_not_mix_and_do_not_wait_for_each_other() -> None:
    async def main() -> None:
        model = MeanModel()
        core = _core(model, max_wait_s=0.3)
        await core.start()
        t0 = time.perf_counter()
        small = asyncio.ensure_future(core.score(_inp(2, 10, size=4)))
        big = asyncio.ensure_future(core.score(_inp(2, 20, size=6)))
        a = await small
        # the queued request of another shape cannot join, so the first batch goes without waiting ...
        assert time.perf_counter() - t0 < 0.2
        b = await big
        # ... while the second, alone, waits out max_wait for companions
        assert time.perf_counter() - t0 >= 0.29
        assert model.sizes == [2, 2] and a.scores["mean"][0] != b.scores["mean"][0]
        await core.close()

    asyncio.run(main())


def test_full_queue_refuses_and_frees_up() -> None:
    async def main() -> None:
        model = MeanModel()
        model.gate.clear()  # hold the scorer so requests pile up
        core = _core(model, max_batch=1, queue_size=2, max_wait_s=0.0)
        await core.start()
        running = [asyncio.ensure_future(core.score(_inp(1, 1)))]
        await asyncio.sleep(0.02)  # the first is being scored (held at the gate) ...
        running += [asyncio.ensure_future(core.score(_inp(1, v))) for v in (2, 3)]
        await asyncio.sleep(0.02)  # ... and two wait
        with pytest.raises(QueueFull, match="queue full"):
            await core.score(_inp(1, 4))
        with pytest.raises(QueueFull):  # a request needing more slots than are left is refused whole
            await core.score(_inp(1, 4))
        model.gate.set()
        assert len(await asyncio.gather(*running)) == 3
        assert core.stats.rejected_full == 2
        assert (await core.score(_inp(1, 5))).ok.all()
        await core.close()

    asyncio.run(main())


def test_deadline_passed_in_queue_is_never_scored() -> None:
    async def main() -> None:
        model = MeanModel(delay=0.3)
        core = _core(model, max_batch=1, max_wait_s=0.0)
        await core.start()
        first = asyncio.ensure_future(core.score(_inp(1, 1)))
        await asyncio.sleep(0.02)
        with pytest.raises(DeadlineExpired):
            await core.score(_inp(1, 2), timeout=0.1)
        await first
        await asyncio.sleep(0.05)
        assert model.sizes == [1] and core.stats.batches == 1  # the expired request never reached the model
        await core.close()

    asyncio.run(main())


def test_scorer_failures_and_nan_fail_items_not_the_service() -> None:
    async def main() -> None:
        core = _core(MeanModel(), max_wait_s=0.0)
        await core.start()
        inp = _inp(3, 40)
        inp.prompts[1] = "nan"
        batch = await core.score(inp)
        assert batch.ok.tolist() == [True, False, True] and batch.errors[1] == "non-finite score"
        boom = await core.score(_inp(2, 40, prompt="boom"))
        assert not boom.ok.any() and "weights exploded" in boom.errors[0]
        assert np.isnan(boom.scores["mean"]).all()
        assert (await core.score(_inp(1, 40))).ok.all()  # still serving
        await core.close()

    asyncio.run(main())


def test_close_drains_queued_work_then_refuses() -> None:
    async def main() -> None:
        core = _core(MeanModel(delay=0.05), max_batch=1, max_wait_s=0.0)
        await core.start()
        pending = [asyncio.ensure_future(core.score(_inp(1, v))) for v in range(4)]
        await asyncio.sleep(0.01)
        assert await core.close(grace_s=2.0)
        assert all(t.result().ok.all() for t in pending)
        with pytest.raises(ShuttingDown):
            await core.score(_inp(1, 1))

    asyncio.run(main())


def test_latents_reach_scorers_that_read_them() -> None:
    class LatentModel(MeanModel):
        def score(
            self, images: np.ndarray, prompts: list[str], latents: np.ndarray | None = None
        ) -> ScoreBatch:
            assert latents is not None and latents.shape == (len(images), 2)
            return ScoreBatch(scores={"mean": latents.sum(1).astype(np.float32)})

    async def main() -> None:
        core = _core(LatentModel(), max_wait_s=0.02)
        await core.start()
        a, b = _inp(2, 1), _inp(1, 1)
        a.latents = np.array([[1, 2], [3, 4]], np.float32)
        b.latents = np.array([[5, 6]], np.float32)
        ra, rb = await asyncio.gather(core.score(a), core.score(b))  # coalesced, latents stacked alike
        assert ra.scores["mean"].tolist() == [3, 7] and rb.scores["mean"].tolist() == [11]
        assert core.stats.coalesced == 1
        await core.close()

    asyncio.run(main())


def test_fast_scorers_run_inline_slow_ones_on_the_scoring_thread() -> None:
    async def main() -> None:
        for delay, inline in ((0.0, True), (0.01, False)):
            model = MeanModel(delay=delay)
            core = _core(model, max_wait_s=0.0)
            await core.start()
            for v in range(4):
                await core.score(_inp(1, v))
            await core.close()
            assert model.threads[0].startswith("score-mean")  # unknown cost: the thread first
            on_loop = [name == threading.current_thread().name for name in model.threads[1:]]
            assert on_loop == [inline] * 3, model.threads

    asyncio.run(main())
