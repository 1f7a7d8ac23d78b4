"""Starting and wiring the run's roles: learner ranks, generator replicas, reward services, data.

The controller asks for `start_roles(cfg, run_dir)` and gets plain handles back; it never deals with
actor options, placement bundles or event loops. Names show up in the Ray dashboard:
`learner-rank0`, `generator-0`, `reward-<name>-0`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from actors.generator import GenerateRequest, RolloutEngine, RolloutGeneratorActor
from actors.learner_group import LearnerFailed, LearnerGroup
from actors.records import Published, Rewards, Rollouts
from orchestrator.config import RL_MODES, RunConfig
from orchestrator.rollout import GenerationFailed, GeneratorPool
from orchestrator.weight_sync import BroadcastFailed, WeightSync

log = logging.getLogger(__name__)


def offline_dpo(cfg: RunConfig) -> bool:
    """DPO on a preference dataset (data.preferences) instead of best-vs-worst pairs sampled online."""
    return cfg.run.mode == "dpo" and cfg.data.preferences is not None


class DataFeed:
    """The run's data sources behind the few calls the controller makes; resumable."""

    def __init__(self, cfg: RunConfig) -> None:
        data = cfg.data
        offline = offline_dpo(cfg)
        self.prompts = data.prompt_source() if cfg.run.mode in RL_MODES and not offline else None
        self.preferences = data.preference_source(cfg.codec.image_size) if offline else None
        self.images = (
            data.dataset_source(cfg.codec.image_size) if cfg.run.mode in ("sft", "pretrain") else None
        )
        self._eval: list[str] | None = data.read_eval_prompts() if data.eval_prompts else None

    def next_prompts(self, n: int) -> list[str]:
        assert self.prompts is not None
        return self.prompts.next_batch(n).prompts

    def next_images(self, n: int) -> tuple[np.ndarray, list[str]]:
        assert self.images is not None
        batch = self.images.next_batch(n)
        return batch.images, batch.captions

    def next_preferences(self, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Offline DPO: (prompts, preferred uint8 [n, H, W, 3], rejected uint8 [n, H, W, 3])."""
        assert self.preferences is not None
        batch = self.preferences.next_batch(n)
        return batch.prompts, batch.preferred, batch.rejected

    def eval_prompts(self, n: int) -> list[str]:
        """The first n fixed evaluation prompts (data.eval_prompts, else the head of the prompt file)."""
        if self._eval is None:
            source = self.prompts or self.images or self.preferences
            assert source is not None
            head = replace_source_order(source)
            self._eval = head
        return self._eval[:n]

    def _sources(self) -> tuple[tuple[str, Any], ...]:
        return (("prompts", self.prompts), ("images", self.images), ("preferences", self.preferences))

    def state(self) -> dict[str, Any]:
        return {k: s.state() for k, s in self._sources() if s is not None}

    def load_state(self, state: dict[str, Any]) -> None:
        for key, source in self._sources():
            if source is not None and key in state:
                source.load_state(state[key])


def _is_actor(exc: BaseException, handle: Any) -> bool:
    """Whether a Ray actor error is about this actor."""
    return getattr(exc, "actor_id", None) == handle._actor_id.hex()


def replace_source_order(source: Any) -> list[str]:
    """Prompts for evaluation from a training source's first epoch, without moving its position."""
    saved = source.state()
    rows = source.read_epoch()
    source.load_state(saved)
    return [r if isinstance(r, str) else next(x for x in r if isinstance(x, str)) for r in rows[:256]]


class RewardScorer:
    """The run's combined reward over gRPC; `available` is False when the recipe names none."""

    def __init__(self, specs: list[Any]) -> None:
        from rewards.client import RewardClientConfig, RewardClientSync

        self.available = bool(specs)
        self._client = RewardClientSync(RewardClientConfig(rewards=specs)) if specs else None

    def score(self, roll: Rollouts, *, update: bool = True) -> Rewards:
        """Score a rollout's images (and its latents, for scorers that read them); `update=False`
        (evaluation) leaves the running reward normalisation as it was."""
        assert self._client is not None, "no reward configured"
        latents = roll.latents.numpy() if roll.latents is not None else None
        return self._client.score_sync(roll.images, roll.prompts, latents=latents, update=update).to_record()

    def state(self) -> dict[str, Any]:
        return self._client.state() if self._client else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self._client:
            self._client.load_state(state)

    def close(self) -> None:
        if self._client:
            self._client.close()


@dataclass(kw_only=True)
class Roles:
    """Handles to everything a run uses."""

    cfg: RunConfig
    learners: LearnerGroup
    pool: GeneratorPool | None
    local_engine: RolloutEngine | None
    rewards: RewardScorer
    data: DataFeed
    metrics: Any
    progress: Any
    rollout_log: Any
    placement_group: Any = None
    reward_hosts: list[Any] = field(default_factory=list)
    sync: WeightSync = field(default_factory=WeightSync)

    def sync_weights(self, *, rewind: bool = False) -> int:
        """Versioned weight sync from the learner to every generator (or the in-process engine) by the
        recipe's `resources.weight_sync`; returns the version they now hold. `rewind` allows an older
        version (after a restore)."""
        if self.sync.backend != "object_store" and self.pool is not None:
            return self._broadcast(self.pool, rewind)
        published = self.learners.publish_for_rollout()
        self.publish(published, rewind=rewind)
        return published.version

    def _broadcast(self, pool: GeneratorPool, rewind: bool) -> int:
        """Collective sync. The group is formed again when any member restarted since it was formed. A
        failed broadcast can leave receivers waiting inside it, so those that did not finish are restarted
        (Ray's max_restarts) before anything else: when a generator died the broadcast is retried in a new
        group, when the learner failed its LearnerFailed goes on to the controller's restore."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        with pool.lock:  # async mode: wait for the groups in flight, as a load does
            deaths, t0 = 0, time.monotonic()
            while deaths < pool.max_attempts and time.monotonic() - t0 < pool.restart_timeout_s:
                source, receivers = self.learners.source, pool.handles
                try:
                    if not self.sync.connected(source, receivers):
                        self.sync.connect(source, receivers)
                    stats = self.sync.broadcast(rewind=rewind, send=self.learners.broadcast_for_rollout)
                except (RayActorError, ActorUnavailableError) as exc:  # a member is down before the broadcast
                    if _is_actor(exc, source):
                        raise LearnerFailed(0, "weight sync", exc) from exc
                    log.info("a generator is not back yet for the weight broadcast (%s); waiting", exc)
                    self.sync.disconnect()
                    time.sleep(0.5)  # Ray restarts it meanwhile
                    continue
                except BroadcastFailed as exc:
                    self.sync.disconnect()
                    for i in exc.unfinished:
                        if i not in exc.dead:
                            ray.kill(receivers[i], no_restart=False)
                    if not exc.dead:
                        raise exc.cause from exc
                    deaths += 1
                    pool.stats.restarts += len(exc.dead)
                    log.warning(
                        "generators %s died in the weight broadcast; retrying in a new group", exc.dead
                    )
                    continue
                pool.broadcast_done(stats.version)
                return stats.version
        raise GenerationFailed(
            f"weight broadcast: generators died {deaths} times (max_attempts={pool.max_attempts}) or were not "
            f"back within restart_timeout_s={pool.restart_timeout_s}"
        )

    def publish(self, published: Published, *, rewind: bool = False) -> None:
        """Versioned weight sync: the object-store copy learner rank 0 put (raw buffers, read without
        copies), loaded and re-quantized by every generator. `rewind` allows an older version (after a
        restore). The in-process engine of dataset modes reads the same copy."""
        import ray

        self.sync.adopt(published, rewind=rewind)
        if self.pool is not None:
            self.pool.load(published.ref, published.version)
        if self.local_engine is not None:
            self.local_engine.load_weights(ray.get(published.ref))

    def sample_eval(self, prompts: list[str], seeds: list[int], groups: list[int], *, steps: int) -> Rollouts:
        """Deterministic ODE samples from the full-precision policy (fixed prompts and seeds), computed
        without rollout.autocast."""
        if self.pool is not None:
            return self.pool.generate(
                prompts, seeds, groups, steps=steps, precision="bf16", noise_level=0.0, evaluation=True
            )
        assert self.local_engine is not None
        req = GenerateRequest(
            prompts=prompts, seeds=seeds, group_ids=groups, steps=steps, precision="bf16",
            expect_version=self.local_engine.version, noise_level=0.0, evaluation=True,
        )  # fmt: skip
        return self.local_engine.generate(req)

    def weights_in_sync(self) -> bool | None:
        """Every generator holds exactly the learner's rollout weights at the current version (None: no
        generators, the in-process engine loads what it is given)."""
        import ray

        if self.pool is None:
            return None
        want = self.learners.rollout_digest()  # hashed on rank 0: the weights stay there
        got = ray.get([h.digest.remote() for h in self.pool.handles])
        return all(tuple(g) == want for g in got)

    def save_grid(self, images: np.ndarray, captions: list[str], path: Path) -> None:
        from orchestrator.metrics import save_grid

        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, captions, path)
        self.metrics.log_image(path.stem, path)

    def shutdown(self) -> None:
        import ray

        self.progress.close()
        self.rollout_log.close()
        self.metrics.close()
        self.rewards.close()
        for host in self.reward_hosts:
            try:
                ray.get(host.stop.remote(), timeout=30)  # graceful: NOT_SERVING, drain
            except Exception:  # already gone; nothing left to drain
                log.debug("reward host did not stop cleanly", exc_info=True)
            ray.kill(host, no_restart=True)  # frees its name for the next run on this cluster
        self.learners.shutdown()
        if self.pool is not None:
            for h in self.pool.handles:
                ray.kill(h, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)


def start_roles(cfg: RunConfig, run_dir: Path) -> Roles:
    """Place and start every role the run's mode needs; returns when all are ready."""
    import ray

    from orchestrator.metrics import MetricsLogger
    from orchestrator.placement import create_placement_group, plan_for, scheduling_strategy
    from orchestrator.progress import Progress
    from orchestrator.rollout_log import RolloutLog
    from orchestrator.schema import to_dict

    plan = plan_for(cfg)
    pg = create_placement_group(plan)
    res = cfg.resources
    rl = cfg.run.mode in RL_MODES

    hosts: list[Any] = []
    specs: list[Any] = []
    for spec in cfg.rewards:
        if spec.address or spec.replicas:
            specs.append(spec)
            continue
        from actors.reward_host import launch_reward_host
        from rewards.server import ServerConfig

        # A fixed port: when the host's process dies, Ray restarts it (max_restarts) and it serves again
        # at the address the client dials; with port 0 it would come back elsewhere and the run would stop.
        host = launch_reward_host(
            spec, server=ServerConfig(port=_free_loopback_port()), max_restarts=-1,
            num_cpus=res.reward_cpus, num_gpus=res.reward_gpus, name=f"reward-{spec.name}-0",
            scheduling_strategy=scheduling_strategy(plan, pg, "reward", len(hosts)),
        )  # fmt: skip
        hosts.append(host)
        specs.append(replace(spec, address=ray.get(host.start.remote())))

    learners = LearnerGroup(
        world_size=res.learner_ranks, model_cfg=cfg.model, learner_cfg=cfg.learner, loss_cfg=cfg.loss,
        seed=cfg.run.seed, placement_group=pg, bundle_indices=plan.indices("learner"),
        num_cpus_per_rank=res.learner_cpus, num_gpus_per_rank=res.learner_gpus,
    )  # fmt: skip

    pool, engine = None, None
    if rl:
        formats = sorted({cfg.rollout.preview_precision, cfg.rollout.final_precision, "bf16"})
        actor = ray.remote(RolloutGeneratorActor)
        # Ray's max_restarts is a lifetime budget: a days-long run would lose a generator (and stop) at its
        # fifth preemption. Unbounded here; a replica that keeps dying within one call still stops the run
        # (GeneratorPool.max_attempts), as a reward host that stays down does (the client's retry budget).
        handles = [
            actor.options(
                name=f"generator-{i}", num_cpus=res.generator_cpus, num_gpus=res.generator_gpus,
                max_restarts=-1, max_task_retries=0,
                scheduling_strategy=scheduling_strategy(plan, pg, "generator", i),
            ).remote(
                cfg.model, cfg.codec, cfg.sampler, cfg.quant, formats,
                num_threads=res.generator_threads, compile=cfg.rollout.compile,
                autocast=cfg.rollout.autocast,
            )
            for i in range(res.generators)
        ]  # fmt: skip
        ray.get([h.ready.remote() for h in handles])  # type: ignore[attr-defined]
        pool = GeneratorPool(handles=handles)
        if res.weight_sync == "collective":
            pool.fetch_snapshot = lambda: learners.publish_retained().ref
    if not rl or offline_dpo(cfg):
        # SFT, pretraining and offline DPO encode dataset images and captions here (SFT and
        # pretraining, which start no generators, also sample their evaluation here).
        engine = RolloutEngine(cfg.model, cfg.codec, cfg.sampler, cfg.quant, ["bf16"])

    return Roles(
        cfg=cfg,
        learners=learners,
        pool=pool,
        local_engine=engine,
        rewards=RewardScorer(specs),
        data=DataFeed(cfg),
        metrics=MetricsLogger(cfg.logging, run_dir, run_name=cfg.run.name, config=to_dict(cfg)),
        progress=Progress(cfg.logging, total=cfg.run.steps, stage=cfg.run.mode),
        rollout_log=RolloutLog(run_dir / "rollouts"),
        placement_group=pg,
        reward_hosts=hosts,
        sync=WeightSync(
            res.weight_backend, timeout_s=cfg.learner.timeout_s, rendezvous_s=res.weight_rendezvous_s
        ),
    )


def _free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now. A launched reward host binds loopback, so it runs on this node."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
