"""The NCCL broadcast path between a learner-rank-0 stand-in and a generator stand-in, one GPU each."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from actors.records import WeightSnapshot
from orchestrator.weight_channel import WeightEndpoint
from orchestrator.weight_sync import WeightSync, state_nbytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason="NCCL needs two GPUs (one rank per device); this machine has fewer",
    ),
]


def big_state(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {f"blocks.{i}.w": torch.randn(2240, 2240, generator=g).to(torch.bfloat16) for i in range(8)}


class Source(WeightEndpoint):
    def __init__(self) -> None:
        self.step(0)

    def step(self, version: int) -> None:  # the new weights already sit on the GPU, as after optim_step
        self.snapshot = WeightSnapshot(
            policy_version=version, state={k: v.cuda() for k, v in big_state(version).items()}
        )
        torch.cuda.synchronize()

    def weights_snapshot(self) -> WeightSnapshot:
        return self.snapshot


class Sink(WeightEndpoint):
    def __init__(self) -> None:
        self.version, self.sums = -1, dict[str, float]()

    def load_weights(self, snapshot: WeightSnapshot) -> int:
        assert all(t.is_cuda for t in snapshot.state.values())
        self.sums = {k: float(v.float().sum()) for k, v in snapshot.state.items()}
        self.version = snapshot.policy_version
        return self.version

    def held(self) -> tuple[int, dict[str, float]]:
        return self.version, self.sums


def test_nccl_broadcast_is_exact_and_fast(ray_cluster: dict[str, Any]) -> None:
    import ray

    source: Any = ray.remote(num_gpus=1)(Source).remote()
    sink: Any = ray.remote(num_gpus=1)(Sink).remote()
    sync = WeightSync("nccl", timeout_s=120)
    sync.connect(source, [sink])
    for version in (1, 2):
        ray.get(source.step.remote(version))
        stats = sync.broadcast()
        held_version, sums = ray.get(sink.held.remote())
        want = {k: float(v.cuda().float().sum()) for k, v in big_state(version).items()}
        assert held_version == version and sums == want
    assert stats.nbytes == state_nbytes(big_state(2))
    assert stats.bytes_per_s > 1e9, f"{stats.bytes_per_s / 1e9:.2f} GB/s"
    for actor in (source, sink):
        ray.kill(actor)
