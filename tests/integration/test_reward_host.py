"""RewardHost: a reward service inside a Ray actor, started with its own Python executable, and back
at the same address after Ray restarts the killed actor."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from rewards.client import RewardClientConfig, RewardClientSync, RewardSpec
from rewards.server import ServerConfig


@pytest.mark.ray
def test_reward_host_serves_from_a_ray_actor_and_survives_a_restart(ray_cluster: dict[str, object]) -> None:
    import ray

    from actors.reward_host import launch_reward_host

    # `python` makes Ray start the actor's worker with that interpreter (runtime_env py_executable);
    # here it is ours, which exercises the same path a separate venv takes.
    spec = RewardSpec(name="jpeg", scorer="jpeg_compressibility", python=sys.executable)
    first = launch_reward_host(spec, server=ServerConfig(max_batch=8), num_cpus=0.5, max_restarts=0)
    address = ray.get(first.start.remote(), timeout=120)
    assert address.startswith("127.0.0.1:") and ray.get(first.ready.remote())
    assert ray.get(first.start.remote()) == address  # idempotent
    ray.get(first.stop.remote())
    assert not ray.get(first.ready.remote())
    ray.kill(first)

    # the port the OS gave the first host, now fixed, so that a restarted actor comes back at it
    port = int(address.rsplit(":", 1)[1])
    host = launch_reward_host(spec, server=ServerConfig(port=port, max_batch=8), num_cpus=0.5, max_restarts=1)
    assert ray.get(host.start.remote(), timeout=120) == address
    client = RewardClientSync(
        RewardClientConfig(
            rewards=[RewardSpec(name="jpeg", scorer=spec.scorer, address=address, retry_budget_s=60)]
        )
    )
    try:
        images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
        scores = client.score_sync(images, ["a", "b", "c"])
        assert scores.ok.all() and (scores.raw["jpeg"] < 0).all()
        assert client.client.info("jpeg").max_batch == 8
        pid = ray.get(host.__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(host, no_restart=False)  # the process dies; Ray restarts the actor, which serves again
        t0 = time.perf_counter()
        while _alive(pid):  # the kill is asynchronous: score only once the old server is gone
            assert time.perf_counter() - t0 < 30
            time.sleep(0.05)
        again = client.score_sync(images[::-1].copy(), ["c", "b", "a"])  # new images: no cache hit
        # the old process is gone, so the restarted actor's server answered
        assert again.ok.all() and np.allclose(again.raw["jpeg"], scores.raw["jpeg"][::-1])
        assert time.perf_counter() - t0 < 60
    finally:
        client.close()
        ray.kill(host)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
