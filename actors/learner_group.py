"""The controller's handle on the learner: `LearnerGroup` creates one `Learner` actor per rank
(actors/learner.py), joins them into one torch.distributed group, fans every call out to all ranks and
turns a rank that died or raised into `LearnerFailed`, on which the controller restores all ranks from a
checkpoint.

    group = LearnerGroup(world_size=2, model_cfg=ModelConfig(), learner_cfg=LearnerConfig(), loss_cfg=LossConfig())
    metrics = group.forward_backward(batch); version, step_metrics = group.optim_step()
"""

from __future__ import annotations

import time
from typing import Any

from actors.learner import Learner, LearnerConfig
from actors.records import Published, TrainBatch, WeightSnapshot
from policy import losses as L
from policy.sana import ModelConfig


class LearnerFailed(RuntimeError):
    """A learner rank died or raised during `method`; the controller restores all ranks from a checkpoint."""

    def __init__(self, rank: int, method: str, cause: BaseException) -> None:
        super().__init__(f"learner-rank{rank} failed in {method}: {type(cause).__name__}: {cause}")
        self.rank, self.method = rank, method


class LearnerGroup:
    """The controller's handle on all learner ranks: creates them, joins them into one group, fans calls out.

    `placement_group` / `bundle_indices` pin rank i to bundle i (the placement code's choice). Every call
    waits for all ranks and raises LearnerFailed naming the first rank that died or raised.
    """

    def __init__(
        self,
        *,
        world_size: int,
        model_cfg: ModelConfig,
        learner_cfg: LearnerConfig,
        loss_cfg: L.LossConfig,
        seed: int = 0,
        placement_group: Any = None,
        bundle_indices: list[int] | None = None,
        num_cpus_per_rank: float = 1.0,
        num_gpus_per_rank: float = 0.0,
        name_prefix: str = "learner",
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        if bundle_indices is not None and len(bundle_indices) != world_size:
            raise ValueError(f"bundle_indices: {len(bundle_indices)} given for {world_size} ranks")
        self.world = world_size
        self._setup_args = (model_cfg, learner_cfg, loss_cfg, seed)
        self._placement = (placement_group, bundle_indices)
        self._resources = (num_cpus_per_rank, num_gpus_per_rank)
        self._prefix = name_prefix
        self.trainable_params = 0
        self._actors: list[Any] = []
        self._start()

    def _start(self) -> None:
        import ray

        pg, bundles = self._placement
        cpus, gpus = self._resources
        actor_cls = ray.remote(Learner)
        self._actors = []
        for rank in range(self.world):
            opts: dict[str, Any] = {
                "name": f"{self._prefix}-rank{rank}", "num_cpus": cpus, "num_gpus": gpus,
                "max_restarts": 0, "max_task_retries": 0,
            }  # fmt: skip
            if pg is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                index = bundles[rank] if bundles is not None else rank
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=index
                )
            threads = self._setup_args[1].num_threads
            self._actors.append(actor_cls.options(**opts).remote(rank, self.world, num_threads=threads))
        try:
            address, port = self._gather([self._actors[0].open_rendezvous.remote()], "open_rendezvous")[0]
            self._call("init_distributed", address, port, self._setup_args[1].timeout_s)
            self.trainable_params = self._call("setup", *self._setup_args)[0]
        except BaseException:
            self.shutdown()  # never leave half a group holding resources and names
            raise

    def _gather(self, refs: list[Any], method: str) -> list[Any]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        rank_of = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            rank = rank_of[ready[0]]
            try:
                results[rank] = ray.get(ready[0])
            except (RayActorError, RayTaskError) as exc:
                failed, cause = rank, exc
                # A dead rank breaks its peers' collectives too: name the rank that died, not a peer.
                if not isinstance(exc, RayActorError) and pending:
                    done, _ = ray.wait(pending, num_returns=len(pending), timeout=5.0)
                    for ref in done:
                        try:
                            ray.get(ref)
                        except RayActorError as died:
                            failed, cause = rank_of[ref], died
                            break
                        except RayTaskError:
                            continue
                raise LearnerFailed(failed, method, cause) from cause
        return results

    def _call(self, method: str, *args: Any) -> list[Any]:
        return self._gather([getattr(a, method).remote(*args) for a in self._actors], method)

    def forward_backward(self, batch: TrainBatch) -> dict[str, float]:
        import ray

        if batch.kind not in ("nft", "grpo", "dpo", "fm"):
            raise ValueError(f"batch.kind: expected nft, grpo, dpo or fm, got {batch.kind!r}")
        if len(batch) % self.world:
            raise ValueError(f"batch: {len(batch)} samples do not split over {self.world} learner ranks")
        return dict(self._call("forward_backward", ray.put(batch))[0])

    def optim_step(self, advance: bool = True) -> tuple[int, dict[str, float]]:
        version, metrics = self._call("optim_step", advance)[0]
        return int(version), dict(metrics)

    def state_for_rollout(self) -> WeightSnapshot:
        snapshot = self._call("state_for_rollout")[0]
        assert isinstance(snapshot, WeightSnapshot)
        return snapshot

    def publish_for_rollout(self) -> Published:
        published = self._call("publish_for_rollout")[0]
        assert isinstance(published, Published)
        return published

    @property
    def source(self) -> Any:
        """Rank 0's actor handle: the collective weight sync's source."""
        return self._actors[0]

    def broadcast_for_rollout(self) -> tuple[int, int]:
        """Every rank gathers, rank 0 broadcasts to the generators' group (they must be receiving)."""
        version, nbytes = self._call("weights_send")[0]
        return int(version), int(nbytes)

    def publish_retained(self) -> Published:
        published = self._gather([self._actors[0].publish_retained.remote()], "publish_retained")[0]
        assert isinstance(published, Published)
        return published

    def rollout_digest(self) -> tuple[int, str]:
        version, digest = self._call("rollout_digest")[0]
        return int(version), str(digest)

    def save(self, path: str) -> str:
        return str(self._call("save", str(path))[0])

    def load(self, path: str) -> int:
        return int(self._call("load", str(path))[0])

    def export_diffusers(self, path: str) -> str:
        return str(self._call("export_diffusers", str(path))[0])

    def counters(self) -> dict[str, int]:
        return dict(self._call("counters")[0])

    def pids(self) -> list[int]:
        return [int(p) for p in self._call("pid")]

    def restart(self) -> None:
        """Replace every rank with a fresh actor (same names); the caller then loads a checkpoint."""
        self.shutdown()
        self._start()

    def shutdown(self) -> None:
        """Kill all ranks and wait until their names are free again."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30.0
        for rank in range(len(self._actors)):
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(f"{self._prefix}-rank{rank}")
                except ValueError:
                    break
                time.sleep(0.05)
        self._actors = []


__all__ = ["LearnerFailed", "LearnerGroup"]
