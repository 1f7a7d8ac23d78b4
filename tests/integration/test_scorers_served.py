"""Every model scorer, tiny and random, served in-process on 127.0.0.1:0 and scored through RewardClient."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rewards.base import SCORER_MODULES, RewardModel, ScoreBatch, make_scorer
from rewards.client import RewardClient, RewardClientConfig, RewardSpec
from rewards.server import RunningServer, ServerConfig, start_server

IMAGE_SCORERS = ["pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward", "vlm"]


@pytest.fixture(scope="module")
def scorer_kwargs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Tiny random weights in each scorer's published layout, written once for the module."""
    root = tmp_path_factory.mktemp("served")
    out = {}
    for name in [*IMAGE_SCORERS, "physics"]:
        module = importlib.import_module(f"rewards.models.{SCORER_MODULES[name]}")
        out[name] = module.random_checkpoint(name, root / name)
    return out


@contextlib.asynccontextmanager
async def serving(models: dict[str, RewardModel]) -> AsyncIterator[RewardClient]:
    """One server per model on a free loopback port, and one client holding them all (raw scores)."""
    running: list[RunningServer] = []
    try:
        for model in models.values():
            running.append(await start_server(model, ServerConfig(port=0, max_batch=8)))
        specs = [
            RewardSpec(
                name=name, scorer=model.info().name, address=server.address, normalize=False, timeout_s=120
            )
            for (name, model), server in zip(models.items(), running)
        ]
        async with RewardClient(RewardClientConfig(rewards=specs, cache_size=0)) as client:
            yield client
    finally:
        for server in running:
            await server.stop(0.5)


def _check(name: str, served: Any, local: ScoreBatch, head: str) -> None:
    np.testing.assert_array_equal(served.ok, local.ok, err_msg=name)
    np.testing.assert_allclose(served.raw[name], local.scores[head], rtol=1e-5, atol=1e-6, err_msg=name)
    for key, value in local.extras.items():
        np.testing.assert_allclose(served.extras[f"{name}/{key}"], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_image_scorers_through_the_service(scorer_kwargs: dict[str, dict[str, Any]]) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 48, 40, 3), dtype=np.uint8)
    prompts = ["a red cat", "a dog on a mat", "", "the sky", "a cat " * 40]
    models = {name: make_scorer(name, **scorer_kwargs[name]) for name in IMAGE_SCORERS}
    local = {name: model.score(images, prompts) for name, model in models.items()}

    async def main() -> Any:
        async with serving(models) as client:
            for name, model in models.items():
                described = client.info(name)
                assert (described.name, described.heads) == (model.info().name, model.info().heads)
                assert described.input_size == model.info().input_size
            return await client.score(images, prompts)

    served = asyncio.run(main())
    assert served.ok.all() and served.total.shape == (5,)
    for name in IMAGE_SCORERS:
        assert local[name].ok.all()
        _check(name, served, local[name], name)


def test_failed_items_and_clips_cross_the_wire(scorer_kwargs: dict[str, dict[str, Any]]) -> None:
    # The random judge answers 3s and 4s here; with the range [0, 3.5] the 4s are out of range. Those items
    # must arrive ok=False with the reason, and NaN, never 0. Physics takes clips [N, T, H, W, 3].
    judge = make_scorer("vlm", **scorer_kwargs["vlm"], mode="number", number_range="0,3.5", max_new_tokens=4)
    physics = make_scorer("physics", **{k: v for k, v in scorer_kwargs["physics"].items() if k != "weights"})
    images = np.random.default_rng(1).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    prompts = ["a cat", "a dog", "red", ""]
    clips = np.zeros((2, 6, 48, 48, 3), dtype=np.uint8)
    for t in range(6):
        clips[:, t, 10 + 2 * t : 22 + 2 * t, 8 + 3 * t : 20 + 3 * t] = 200
    clips[1] = clips[1][[0, 3, 5, 1, 4, 2]]
    local_judge, local_physics = judge.score(images, prompts), physics.score(clips, ["", ""])
    assert (~local_judge.ok).any() and local_judge.ok.any(), (
        "the random judge should pass some items, fail others"
    )

    async def main() -> tuple[Any, Any]:
        async with serving({"judge": judge}) as client:
            a = await client.score(images, prompts)
        async with serving({"physics": physics}) as client:
            b = await client.score(clips, ["", ""])
        return a, b

    served_judge, served_physics = asyncio.run(main())
    np.testing.assert_array_equal(served_judge.ok, local_judge.ok)
    assert np.isnan(served_judge.total[~served_judge.ok]).all()
    for i in np.flatnonzero(~local_judge.ok):
        assert (
            local_judge.errors[i] in served_judge.errors[i]
            and "no number in [0, 3.5]" in served_judge.errors[i]
        )
    ok = local_judge.ok
    np.testing.assert_allclose(served_judge.raw["judge"][ok], local_judge.scores["vlm"][ok], rtol=1e-6)
    _check("physics", served_physics, local_physics, "physics")
    assert served_physics.raw["physics"][0] > served_physics.raw["physics"][1]


def test_random_checkpoint_kwargs_are_paths(scorer_kwargs: dict[str, dict[str, Any]]) -> None:
    # What the bench suite relies on: every scorer module writes weights and returns make_scorer kwargs.
    for name, kwargs in scorer_kwargs.items():
        assert kwargs and all(Path(v).exists() for v in kwargs.values()), name
