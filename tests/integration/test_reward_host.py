"""RewardHost: a reward service inside a Ray actor, started with its own Python executable."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rewards.client import RewardClientConfig, RewardClientSync, RewardSpec
from rewards.server import ServerConfig


@pytest.mark.ray
def test_reward_host_serves_from_a_ray_actor_in_its_own_interpreter(ray_cluster: dict[str, object]) -> None:
    import ray

    from actors.reward_host import launch_reward_host

    # `python` makes Ray start the actor's worker with that interpreter (runtime_env py_executable);
    # here it is ours, which exercises the same path a separate venv takes.
    spec = RewardSpec(name="jpeg", scorer="jpeg_compressibility", python=sys.executable)
    host = launch_reward_host(spec, server=ServerConfig(max_batch=8), num_cpus=0.5)
    address = ray.get(host.start.remote(), timeout=120)
    assert address.startswith("127.0.0.1:") and ray.get(host.ready.remote())
    assert ray.get(host.start.remote()) == address  # idempotent
    client = RewardClientSync(
        RewardClientConfig(rewards=[RewardSpec(name="jpeg", scorer=spec.scorer, address=address)])
    )
    try:
        images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
        scores = client.score_sync(images, ["a", "b", "c"])
        assert scores.ok.all() and (scores.raw["jpeg"] < 0).all()
        assert client.client.info("jpeg").max_batch == 8
    finally:
        client.close()
        ray.get(host.stop.remote())
    assert not ray.get(host.ready.remote())
    ray.kill(host)
