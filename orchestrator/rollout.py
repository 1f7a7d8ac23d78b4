"""The RL rollout stage: fan generation out to generator replicas, score, select, build a TrainBatch (and
the dataset modes' flow-matching batch).

Generator replicas may die mid-call: Ray restarts them (`max_restarts`), and this pool reloads the
current weights into the restarted replica and regenerates the lost groups. Generation is a pure
function of (version, prompts, seeds), so a repeated call returns the same samples.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from actors.generator import GenerateRequest, StaleWeights
from actors.records import Rewards, Rollouts, TrainBatch
from kernels.quantize import Format
from policy.advantage import group_advantages
from policy.codecs import from_uint8
from policy.flow import drop_captions
from policy.selection import best_worst_pairs, select_seeds

if TYPE_CHECKING:
    import numpy as np

    from actors.generator import RolloutEngine

log = logging.getLogger(__name__)
T = TypeVar("T")


class GenerationFailed(RuntimeError):
    """A generator replica kept failing after its restarts were used up."""


@dataclass(kw_only=True, slots=True)
class PoolStats:
    restarts: int = 0
    regenerated_groups: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass(kw_only=True, slots=True)
class GeneratorPool:
    """Generator replicas (Ray actor handles) that all hold the same policy version."""

    handles: list[Any]
    max_attempts: int = 4
    """A replica that dies this many times within one call (or sync) stops the run (GenerationFailed)."""
    restart_timeout_s: float = 120.0
    """How long one call waits for its replica to come back from Ray's restarts."""
    version: int = -1
    snapshot_ref: Any = None
    fetch_snapshot: Callable[[], Any] | None = None
    """Collective sync keeps no object-store copy: a replica that restarts fetches one through this (learner
    rank 0's retained broadcast) the first time it is needed for the version."""
    stats: PoolStats = field(default_factory=PoolStats)
    lock: threading.RLock = field(default_factory=threading.RLock)
    """Held for a whole generate or load: a sync waits for in-flight groups (async mode)."""

    def load(self, snapshot_ref: Any, version: int) -> None:
        """Send one weight snapshot (an object-store ref) to every replica; they re-quantize on receipt."""
        import ray
        from ray.exceptions import RayActorError

        with self.lock:
            self.snapshot_ref = snapshot_ref  # what a restarted replica reloads
            refs = [h.load_weights.remote(snapshot_ref) for h in self.handles]
            got = []
            for replica, ref in enumerate(refs):
                try:
                    got.append(ray.get(ref))
                except RayActorError as exc:  # died mid-sync: Ray restarts it, the new process loads
                    log.warning("generator-%d died loading v%d (%s); reloading", replica, version, exc)
                    self.stats.restarts += 1
                    got.append(self._retry(replica, f"loading v{version}", exc, self._load_one))
            if any(v != version for v in got):
                raise RuntimeError(f"generators loaded versions {got}, expected {version}")
            self.version = version

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        group_ids: list[int],
        *,
        steps: int,
        precision: Format,
        return_trajectory: bool = False,
        noise_level: float | None = None,
        evaluation: bool = False,
    ) -> Rollouts:
        """Samples for every (prompt, seed); whole groups go to one replica so no group mixes versions.
        Holds the pool lock throughout, so a weight sync waits for the groups in flight."""
        with self.lock:
            return self._generate(
                prompts, seeds, group_ids, steps, precision, return_trajectory, noise_level, evaluation
            )

    def _generate(
        self,
        prompts: list[str],
        seeds: list[int],
        group_ids: list[int],
        steps: int,
        precision: Format,
        return_trajectory: bool,
        noise_level: float | None,
        evaluation: bool,
    ) -> Rollouts:
        t0 = time.perf_counter()
        groups = sorted(set(group_ids))
        shards: list[list[int]] = [[] for _ in self.handles]
        for i, g in enumerate(groups):
            shards[i % len(self.handles)].append(g)
        requests = []
        for replica, shard in enumerate(shards):
            rows = [i for i, g in enumerate(group_ids) if g in set(shard)]
            if rows:
                req = GenerateRequest(
                    prompts=[prompts[i] for i in rows],
                    seeds=[seeds[i] for i in rows],
                    group_ids=[group_ids[i] for i in rows],
                    steps=steps,
                    precision=precision,
                    expect_version=self.version,
                    return_trajectory=return_trajectory,
                    noise_level=noise_level,
                    evaluation=evaluation,
                )
                requests.append((replica, req, len(shard)))
        pending = {r: self.handles[r].generate.remote(req) for r, req, _ in requests}
        parts: dict[int, Rollouts] = {}
        for replica, req, n_groups in requests:
            parts[replica] = self._collect(replica, req, pending[replica], n_groups)
        out = Rollouts.concat([parts[r] for r, _, _ in requests])
        order = torch.tensor(
            [
                i
                for r, req, _ in requests
                for i in (j for j, g in enumerate(group_ids) if g in set(req.group_ids))
            ]
        )
        out = out.select(torch.argsort(order))  # back to the caller's order
        out.seconds = time.perf_counter() - t0
        self.stats.images += len(out)
        self.stats.seconds += out.seconds
        return out

    def _collect(self, replica: int, req: GenerateRequest, ref: Any, n_groups: int) -> Rollouts:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            if isinstance(exc, RayTaskError) and not isinstance(exc.cause, StaleWeights):
                raise
            first = exc

        def regenerate(replica: int) -> Rollouts:
            # The replica restarted without weights (or with old ones): reload, then regenerate.
            self._load_one(replica)
            return ray.get(self.handles[replica].generate.remote(req))

        self.stats.restarts += 1
        self.stats.regenerated_groups += n_groups
        log.warning(
            "generator-%d lost its work (%s); reloading v%d and regenerating", replica, first, self.version
        )
        return self._retry(replica, f"generating for v{self.version}", first, regenerate)

    def broadcast_done(self, version: int) -> None:
        """Every replica received `version` by a collective broadcast (no object-store copy made yet)."""
        self.version, self.snapshot_ref = version, None

    def _load_one(self, replica: int) -> int:
        import ray

        if self.snapshot_ref is None and self.fetch_snapshot is not None:
            self.snapshot_ref = self.fetch_snapshot()
        return int(ray.get(self.handles[replica].load_weights.remote(self.snapshot_ref)))

    def _retry(self, replica: int, what: str, first: BaseException, call: Callable[[int], T]) -> T:
        """`call(replica)` until it succeeds, after the failure `first`. Calls fail while Ray restarts the
        replica (`max_restarts=-1`), so this waits; but a replica that dies again and again (killed each
        time Ray restarts it, or a call that kills its process) raises GenerationFailed once it died
        `max_attempts` times, and any replica that is not back within `restart_timeout_s`."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        cause, deaths = first, 1
        restarts = _restart_count(self.handles[replica])
        t0 = time.monotonic()
        while deaths < self.max_attempts and time.monotonic() - t0 < self.restart_timeout_s:
            time.sleep(0.5)  # let Ray notice the death and restart the process before the next call
            try:
                return call(replica)
            except (RayActorError, RayTaskError) as exc:
                if isinstance(exc, RayTaskError) and not isinstance(exc.cause, StaleWeights):
                    raise
                cause = exc
            now = _restart_count(self.handles[replica])
            if restarts is not None and now is not None:
                deaths, restarts = deaths + now - restarts, now
            elif not isinstance(cause, ActorUnavailableError):  # no count from Ray: a call that died
                deaths += 1
        raise GenerationFailed(
            f"generator-{replica} failed {what}: it died {deaths} times (max_attempts={self.max_attempts}) "
            f"in {time.monotonic() - t0:.0f} s; "
            f"last cause: {type(cause).__name__}: {cause}"
        ) from cause


def _restart_count(handle: Any) -> int | None:
    """How often Ray restarted the actor, from Ray's actor table; None where this Ray does not say."""
    import ray

    try:
        return int(ray._private.state.actors(handle._actor_id.hex())["NumRestarts"])
    except Exception:  # a private API: a Ray upgrade may change it
        return None


def advantage_batch(
    rollouts: Rollouts,
    rewards: Rewards,
    *,
    std: str,
    world: int,
    seed: int,
    train_steps: torch.Tensor | None = None,
) -> tuple[TrainBatch | None, dict[str, float]]:
    """NFT batch (clean samples + advantages), or GRPO's when `train_steps` is given (the SDE
    trajectories and rollout log-probs too). Zero-signal groups and failed items are dropped, the rest
    trimmed to a multiple of the learner world size; None when nothing carries signal."""
    grpo = train_steps is not None
    if grpo and (rollouts.trajectory is None or rollouts.log_probs is None):
        raise ValueError("GRPO needs rollouts sampled with return_trajectory=True")
    adv = group_advantages(rewards.total, rollouts.group_ids, std=std, ok=rewards.ok)  # type: ignore[arg-type]
    keep = torch.nonzero(adv.mask).flatten()
    keep = keep[: (keep.numel() // world) * world]
    metrics = {"zero_var_fraction": float(adv.zero_var_fraction), "trained_items": float(keep.numel())}
    if keep.numel() == 0:
        return None, metrics
    r = rollouts.select(keep)
    batch = TrainBatch(
        kind="grpo" if grpo else "nft",
        policy_version=r.policy_version,
        x0=r.latents,
        text=r.text,
        text_mask=r.text_mask,
        advantages=adv.advantages[keep],
        seed=seed,
    )
    if grpo:
        batch.trajectory, batch.sigmas, batch.log_probs = r.trajectory, r.sigmas, r.log_probs
        batch.train_steps = train_steps
    return batch, metrics


def dpo_batch(
    rollouts: Rollouts, rewards: Rewards, *, world: int, seed: int
) -> tuple[TrainBatch | None, dict[str, float]]:
    """Online Diffusion-DPO: best vs worst of each group."""
    win, lose = best_worst_pairs(rewards.total, rollouts.group_ids, rewards.ok)
    n = (win.numel() // world) * world
    metrics = {"pairs": float(n)}
    if n == 0:
        return None, metrics
    w, lo = rollouts.select(win[:n]), rollouts.select(lose[:n])
    return (
        TrainBatch(
            kind="dpo",
            policy_version=w.policy_version,
            x0=w.latents,
            x0_rejected=lo.latents,
            text=w.text,
            text_mask=w.text_mask,
            seed=seed,
        ),
        metrics,
    )


def keep_seeds(
    rollouts: Rollouts, rewards: Rewards, *, keep: int, how: str, generator: torch.Generator
) -> torch.Tensor:
    """Stage-1 -> stage-2 selection (Sol-RL), by the cheap pass's rewards."""
    return select_seeds(rewards.total, rollouts.group_ids, rewards.ok, keep, how, generator)  # type: ignore[arg-type]


def grpo_train_steps(roll: Rollouts, fraction: float, rng: torch.Generator) -> torch.Tensor:
    """A random subset of the SDE steps to train on (Flow-GRPO trains a fraction of the steps)."""
    assert roll.sde_mask is not None
    sde = torch.nonzero(roll.sde_mask).flatten()
    k = max(1, round(fraction * sde.numel()))
    return torch.sort(sde[torch.randperm(sde.numel(), generator=rng)[:k]]).values


def dataset_batch(
    engine: RolloutEngine, images: np.ndarray, captions: list[str], caption_dropout: float, seed: int
) -> tuple[TrainBatch, dict[str, float]]:
    """A flow-matching batch from dataset records (uint8 [B, H, W, 3] images and their captions), with the
    step's seed choosing which captions become the empty prompt; `scripts/rl_sweep.py` builds its replayed
    pretraining steps with it too."""
    with torch.no_grad():  # frozen codecs
        x0 = engine.codec.encode(from_uint8(images))
    captions = drop_captions(captions, caption_dropout, seed)
    text, mask = engine.encode(captions)
    batch = TrainBatch(kind="fm", policy_version=-1, x0=x0, text=text, text_mask=mask, seed=seed)
    return batch, {"data/captions_dropped": float(sum(c == "" for c in captions))}


def preference_batch(
    engine: RolloutEngine, prompts: list[str], preferred: np.ndarray, rejected: np.ndarray, seed: int
) -> tuple[TrainBatch, dict[str, float]]:
    """An offline Diffusion-DPO batch from preference records (uint8 [B, H, W, 3] preferred and rejected
    images of each prompt)."""
    with torch.no_grad():  # frozen codecs
        x_w, x_l = (engine.codec.encode(from_uint8(x)) for x in (preferred, rejected))
    text, mask = engine.encode(prompts)
    batch = TrainBatch(
        kind="dpo", policy_version=-1, x0=x_w, x0_rejected=x_l, text=text, text_mask=mask, seed=seed
    )
    return batch, {"pairs": float(len(prompts))}


def reward_metrics(roll: Rollouts, rew: Rewards, stage: str) -> dict[str, float]:
    """A scored batch's row in metrics.jsonl: means over the items that scored (`stage`/reward_mean, one
    per scorer and extra) and this call's generation rate."""
    ok, out = rew.ok, dict[str, float]()
    out[f"{stage}/reward_mean"] = float(rew.total[ok].mean()) if ok.any() else float("nan")
    if ok.any():
        out.update(
            {f"{stage}/{name}": float(v[ok].mean()) for name, v in {**rew.per_scorer, **rew.extras}.items()}
        )
    if roll.seconds > 0:  # this call's rate (the pool's counters add up the whole run)
        out[f"{stage}/images_per_s"] = len(roll) / roll.seconds
    return out
