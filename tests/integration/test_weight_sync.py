"""Weight sync: exact round trips through the object store and the collective (gloo) path, monotonic
versions, the version handshake, no version mixed into a group, and measured bytes/s."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from actors.records import WeightSnapshot
from orchestrator.weight_channel import WeightEndpoint, _buckets
from orchestrator.weight_sync import WeightSync, WeightSyncError, pack, state_nbytes


def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.bias": torch.randn(80, generator=g),
        "scale_shift_table": torch.randn(6, 32, generator=g).to(torch.float16),
        "counter": torch.tensor(seed, dtype=torch.int64),  # 0-dim
        "mask": torch.rand(7, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


class Generatorish(WeightEndpoint):
    """Stands in for the generator actor: loads snapshots, samples 'groups' step by step."""

    def __init__(self) -> None:
        self.version = -1
        self.state: dict[str, torch.Tensor] = {}
        self.misreport = 0

    def load_weights(self, snapshot: WeightSnapshot) -> int:
        self.state = {k: v.clone() for k, v in snapshot.state.items()}
        self.version = snapshot.policy_version
        return self.version + self.misreport  # misreport != 0: e.g. restarted and reloaded something else

    def set_misreport(self, offset: int) -> None:
        self.misreport = offset

    def held(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.version, self.state

    def generate_group(self, steps: int) -> list[int]:
        """The version seen at every denoising step of one group."""
        seen = []
        for _ in range(steps):
            seen.append(self.version)
            time.sleep(0.02)
        return seen


class Learnerish(WeightEndpoint):
    """Stands in for learner rank 0 on the collective path."""

    weights_bucket_bytes = 1024  # small: several broadcasts per dtype

    def __init__(self) -> None:
        self.snapshot = WeightSnapshot(policy_version=0, state=make_state(0))

    def step(self, version: int) -> None:
        self.snapshot = WeightSnapshot(policy_version=version, state=make_state(version))

    def weights_snapshot(self) -> WeightSnapshot:
        return self.snapshot


@pytest.fixture(scope="module")
def actors(ray_cluster: dict[str, Any]) -> Iterator[tuple[Any, list[Any]]]:
    """Learner rank 0 stand-in and two generator stand-ins, shared by this module's tests (an actor
    costs a worker process)."""
    import ray

    source: Any = ray.remote(num_cpus=0.1)(Learnerish).remote()
    gens: list[Any] = [ray.remote(num_cpus=0.1)(Generatorish).remote() for _ in range(2)]
    yield source, gens
    for actor in (source, *gens):
        ray.kill(actor)


def test_pack_round_trips_every_dtype_and_shape_through_pickle_5() -> None:
    snap = WeightSnapshot(policy_version=3, state=make_state(1))
    back = pickle.loads(pickle.dumps(pack(snap), protocol=5))
    assert back.policy_version == 3 and same(back.state, snap.state)
    assert state_nbytes(snap.state) == 96 * 32 * 2 + 80 * 4 + 6 * 32 * 2 + 8 + 7


def test_buckets_split_by_dtype_and_size() -> None:
    meta = [("a", "float32", [10]), ("b", "float32", [10]), ("c", "bfloat16", [4]), ("d", "float32", [30])]
    assert _buckets(meta, bucket_bytes=80) == [[0, 1], [2], [3]]
    assert _buckets(meta, bucket_bytes=40) == [[0], [1], [2], [3]]


@pytest.mark.ray
def test_object_store_sync_is_exact_versioned_and_measured(actors: tuple[Any, list[Any]]) -> None:
    import ray

    gens = actors[1]
    sync = WeightSync()
    for version in (1, 2):
        snap = WeightSnapshot(policy_version=version, state=make_state(version))
        stats = sync.deliver(gens, sync.publish(snap))
        assert stats.version == version and stats.nbytes == state_nbytes(snap.state) and stats.bytes_per_s > 0
        for held_version, state in ray.get([g.held.remote() for g in gens]):
            assert held_version == version and same(state, snap.state)
    with pytest.raises(WeightSyncError, match="went back from 2 to 1"):
        sync.publish(WeightSnapshot(policy_version=1, state=make_state(1)))
    assert sync.publish(WeightSnapshot(policy_version=1, state=make_state(1)), rewind=True).version == 1


@pytest.mark.ray
def test_handshake_rejects_a_generator_reporting_another_version(actors: tuple[Any, list[Any]]) -> None:
    import ray

    gens = actors[1]
    ray.get(gens[1].set_misreport.remote(-1))
    sync = WeightSync()
    try:
        with pytest.raises(WeightSyncError, match=r"generators \[1\] report versions \[4\], expected 5"):
            sync.deliver(gens, sync.publish(WeightSnapshot(policy_version=5, state=make_state(5))))
    finally:
        ray.get(gens[1].set_misreport.remote(0))


@pytest.mark.ray
def test_a_group_in_flight_never_sees_the_new_version(actors: tuple[Any, list[Any]]) -> None:
    import ray

    gen = actors[1][0]
    sync = WeightSync()
    sync.deliver([gen], sync.publish(WeightSnapshot(policy_version=1, state=make_state(1))))
    group = gen.generate_group.remote(10)  # ~0.2 s of sampling
    time.sleep(0.05)
    sync.deliver([gen], sync.publish(WeightSnapshot(policy_version=2, state=make_state(2))))
    assert set(ray.get(group)) == {1}  # the load waited for the group to finish
    assert set(ray.get(gen.generate_group.remote(2))) == {2}


@pytest.mark.ray
def test_collective_broadcast_over_gloo_is_exact_and_versioned(actors: tuple[Any, list[Any]]) -> None:
    import ray

    source, gens = actors
    sync = WeightSync("gloo", timeout_s=120)
    sync.connect(source, gens)
    for version in (0, 3):
        ray.get(source.step.remote(version))
        stats = sync.broadcast()
        assert stats.version == version and stats.nbytes == state_nbytes(make_state(version))
        for held_version, state in ray.get([g.held.remote() for g in gens]):
            assert held_version == version and same(state, make_state(version))
    ray.get(source.step.remote(1))
    with pytest.raises(WeightSyncError, match="went back from 3 to 1"):
        sync.broadcast()
