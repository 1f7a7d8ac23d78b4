"""The controller: the only code that knows the order of the dataflow.

    prompts -> generators (stage 1: low precision, few steps) -> rewards -> select K of N
            -> generators (stage 2: BF16, full steps) -> rewards -> advantages -> learner
            -> weight sync (versioned) -> generators ...

SFT and pretraining skip the generators and reward services: dataset batches go straight to the
learner. Actors never call each other; everything below is wired here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from actors.records import Rewards, Rollouts, TrainBatch
from orchestrator.buffer import AsyncProducer, ProducerStopped
from orchestrator.config import RL_MODES, RunConfig
from orchestrator.replay import ReplayBuffer, replay_seed
from orchestrator.roles import Roles, start_roles
from orchestrator.rollout import (
    advantage_batch,
    dataset_batch,
    dpo_batch,
    grpo_train_steps,
    keep_seeds,
    preference_batch,
    reward_metrics,
)
from policy.checkpoint import atomic_dir, is_complete, latest_complete, prune

log = logging.getLogger(__name__)
T = TypeVar("T")
REPLAY_METRICS = ("loss", "nonfinite_loss", "updates_loss")
"""What a step's row logs of best-sample replay's learner metrics (as replay/...)."""


class RunFailed(RuntimeError):
    """The run stopped for a reason the user must see (skip rate, lost service, failed learner)."""


@dataclass(kw_only=True, slots=True)
class Counters:
    """What went wrong and was handled; saved with checkpoints and reported at the end."""

    skipped_steps: int = 0
    skipped_items: int = 0
    seen_items: int = 0
    stale_dropped: int = 0
    learner_restores: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, items: int = 0) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.skipped_items += items


class Controller:
    """Runs one recipe to completion on an already-connected Ray cluster."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.step = 0
        self.version = 0
        self.rng = torch.Generator().manual_seed(cfg.run.seed)
        self.counters = Counters()
        self.roles: Roles | None = None
        self.produced = 0
        """Rollout rounds produced; equals `step` in sync mode, runs ahead of it in async mode."""
        self._producer: AsyncProducer | None = None
        self._log_lock = threading.Lock()
        replay = cfg.rollout.replay
        self.replay = ReplayBuffer(replay, cfg.rewards[0].name) if replay.enabled and cfg.rewards else None
        """Best-sample replay beside NFT (rollout.replay); saved with checkpoints."""
        self._first_state: dict[str, Any] | None = None
        """The controller's state before step 1: what a learner failure before the first checkpoint
        rewinds to (the restarted ranks start from model.pretrained)."""

    # ---------------------------------------------------------------- lifecycle
    def run(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.roles = roles = start_roles(cfg, self.run_dir)
        try:
            if resume and (ckpt := latest_checkpoint(self.run_dir)) is not None:
                self._restore(ckpt)
            if self.step == 0:
                self._first_state = self._state()
            self._sync()
            before: dict[str, float] = {}
            if self.step == 0:  # a resumed run evaluated before its first step already
                before = self._guarded("evaluation before training", partial(self._evaluate, "before")) or {}
            if cfg.run.mode in RL_MODES and cfg.pipeline.enabled:
                self._producer = self._start_producer()
            end: tuple[dict[str, float], bool | None] | None = None
            while end is None:  # a learner restore in the final phase rewinds; train up to the end again
                while self.step < cfg.run.steps:
                    t_step = time.perf_counter()
                    metrics = self._guarded_step()
                    metrics["time/step_s"] = time.perf_counter() - t_step
                    self.step += 1
                    metrics["step"] = float(self.step)
                    roles.metrics.log(self.step, metrics)
                    roles.progress.update(self.step, metrics)
                    self._check_skip_rate()
                    step, every = self.step, cfg.run.eval_every
                    if every and step % every == 0 and step < cfg.run.steps:
                        self._guarded(f"evaluation after step {step}", partial(self._evaluate, f"step{step}"))
                    if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                        self._guarded(f"checkpoint of step {self.step}", self._checkpoint)
                if self._producer is not None:
                    self.counters.stale_dropped += self._producer.stop()
                    self._producer = None
                end = self._guarded("final evaluation, checkpoint and export", self._finish)
            after, in_sync = end
            summary = {
                "steps": self.step,
                "wall_s": time.perf_counter() - t_start,
                "before": before,
                "after": after,
                "counters": _asdict(self.counters),
                "generator": _asdict(roles.pool.stats) if roles.pool else {},
                "weights_in_sync": in_sync,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
            return summary
        finally:
            if self._producer is not None:
                self._producer.stop()
            roles.shutdown()

    def evaluate_once(self, tag: str, step: int) -> dict[str, float]:
        """Only the evaluation of the weights the recipe starts from, logged as of `step` (`sana-rl eval`):
        no training, no checkpoint, no export."""
        self.step = step
        self.roles = start_roles(self.cfg, self.run_dir)
        try:
            self._sync()
            return self._evaluate(tag)
        finally:
            self.roles.shutdown()

    # ---------------------------------------------------------------- one step
    def _guarded_step(self) -> dict[str, float]:
        from actors.learner_group import LearnerFailed
        from orchestrator.rollout import GenerationFailed
        from rewards.client import RewardServiceDown

        assert self.roles is not None
        while True:  # a learner failure rewinds to the last checkpoint and trains the step after it
            start = self._state() if self._producer is None else None
            try:
                return self._train_step()
            except (RewardServiceDown, GenerationFailed, RunFailed) as exc:
                # Stop with a checkpoint to resume from. In sync mode it holds the state this step started
                # from (the step trained nothing), so a resumed run repeats the step exactly.
                if start is not None:
                    self._load_state(start)
                self._checkpoint_if_possible()
                if isinstance(exc, RunFailed):
                    raise
                raise RunFailed(
                    f"step {self.step + 1} failed (checkpoint of step {self.step} kept): {exc}"
                ) from exc
            except LearnerFailed as exc:  # run.max_restores bounds how often this goes round
                self._recover_learners(exc, f"step {self.step + 1}")

    def _guarded(self, phase: str, fn: Callable[[], T]) -> T | None:
        """Run a phase outside the training step (evaluation, checkpoint, export) with the step's fault
        handling. None: a learner rank died and the run was rewound to the last checkpoint, so the caller's
        loop trains the steps after it again (the dead rank's state, and so this phase, is lost)."""
        from actors.learner_group import LearnerFailed
        from orchestrator.rollout import GenerationFailed
        from rewards.client import RewardServiceDown

        try:
            return fn()
        except LearnerFailed as exc:
            self._recover_learners(exc, phase)
            return None
        except (RewardServiceDown, GenerationFailed) as exc:
            self._checkpoint_if_possible()  # the state after step `self.step`: complete, resumable
            raise RunFailed(f"{phase} failed (checkpoint of step {self.step} kept): {exc}") from exc

    def _recover_learners(self, exc: BaseException, where: str) -> None:
        """A learner rank died in `where`: restart every rank from the last checkpoint and rewind the run to
        it (run.on_learner_failure=restore, at most run.max_restores times), or stop with RunFailed. A rank
        that dies again during the restore uses up another restore."""
        from actors.learner_group import LearnerFailed

        assert self.roles is not None
        ckpt = latest_checkpoint(self.run_dir)
        stale_dropped = self.counters.stale_dropped
        if self._producer is not None:
            # The producer samples with what the restore rewinds (RNG, data position, reward
            # statistics, policy version): stop it, restore, and start a fresh one from there.
            stale_dropped += self._producer.stop()
            self._producer = None
        while True:
            stop = {
                "run.on_learner_failure=stop": self.cfg.run.on_learner_failure == "stop",
                f"run.max_restores={self.cfg.run.max_restores} used": (
                    self.counters.learner_restores >= self.cfg.run.max_restores
                ),
                # the restarted ranks would start from model.pretrained while the run counts on from here
                "no checkpoint to restore from": ckpt is None and self.step > 0,
            }
            if reasons := [why for why, hit in stop.items() if hit]:
                self._checkpoint_if_possible()
                raise RunFailed(f"learner failed in {where}: {exc} ({', '.join(reasons)})") from exc
            log.warning("learner failed in %s (%s); restoring all ranks from %s", where, exc, ckpt)
            restores = self.counters.learner_restores + 1
            try:
                self.roles.learners.restart()
                self._restore(ckpt)
                self._sync(rewind=True)
            except LearnerFailed as again:
                exc, where = again, f"the restore from {ckpt}"
                continue
            finally:
                self.counters.learner_restores = restores  # the checkpoint's counters predate the failure
            break
        self.counters.stale_dropped = stale_dropped
        if self.cfg.run.mode in RL_MODES and self.cfg.pipeline.enabled:
            self._producer = self._start_producer()

    def _start_producer(self) -> AsyncProducer:
        pool = self.roles.pool if self.roles else None
        assert pool is not None
        return AsyncProducer(self._make_batch, lambda: pool.version, self.cfg.pipeline)

    def _train_step(self) -> dict[str, float]:
        assert self.roles is not None
        t0 = time.perf_counter()
        if self._producer is not None:
            try:
                batch, metrics = self._producer.next_batch(self.version)
            except ProducerStopped as exc:
                raise RunFailed(str(exc)) from exc.__cause__
        elif self.cfg.run.mode in RL_MODES:
            batch, metrics = self._make_batch()
        else:
            batch, metrics = self._dataset_batch()
        t1 = time.perf_counter()
        if batch is None:
            self.counters.skipped_steps += 1
            self.counters.skip("no_signal")
            metrics["skipped"] = 1.0
            return metrics
        replayed: dict[str, float] = {}
        if self.replay is not None and batch.kind == "nft":  # its gradients join the NFT batch's
            extra = self.replay.batch(
                replay_seed(self.cfg.run.seed, self.step + 1), self.roles.learners.world
            )
            if extra is not None:
                replayed = self.roles.learners.forward_backward(extra)
        fb = self.roles.learners.forward_backward(batch)
        version, om = self.roles.learners.optim_step()
        if om.get("skipped", 0.0):
            self.counters.skipped_steps += 1
            self.counters.skip("non_finite_grad")
        elif replayed:
            replayed.update(self._replay_updates())
        t2 = time.perf_counter()
        self.version = version
        if self._producer is not None:
            self._producer.buffer.advance(version)
        if self.roles.pool is not None:  # SFT/pretraining sync lazily, before they sample for evaluation
            self._sync()
        t3 = time.perf_counter()
        metrics.update({f"learner/{k}": v for k, v in {**fb, **om}.items()})
        metrics.update({f"replay/{k}": v for k, v in replayed.items() if k in REPLAY_METRICS})
        metrics.update({"time/rollout_s": t1 - t0, "time/learn_s": t2 - t1, "time/sync_s": t3 - t2})
        return metrics

    def _replay_updates(self) -> dict[str, float]:
        """rollout.replay.updates further updates on fresh replay draws, within the step's policy version."""
        assert self.roles is not None and self.replay is not None
        losses: list[float] = []
        for k in range(1, self.replay.cfg.updates + 1):
            extra = self.replay.batch(
                replay_seed(self.cfg.run.seed, self.step + 1, k), self.roles.learners.world
            )
            assert extra is not None  # the step's own update drew from the same, non-empty buffer
            losses.append(self.roles.learners.forward_backward(extra)["loss"])
            if self.roles.learners.optim_step(advance=False)[1].get("skipped", 0.0):
                self.counters.skip("non_finite_replay_grad")
        return {"updates_loss": sum(losses) / len(losses)} if losses else {}

    def _dataset_batch(self) -> tuple[TrainBatch | None, dict[str, float]]:
        assert self.roles is not None
        images, captions = self.roles.data.next_images(self.cfg.learner.batch_size)
        engine = self.roles.local_engine
        assert engine is not None  # dataset modes sample and encode in-process
        return dataset_batch(engine, images, captions, self.cfg.loss.fm.caption_dropout, self._seed())

    def _preference_batch(self) -> tuple[TrainBatch | None, dict[str, float]]:
        """Offline Diffusion-DPO: (prompt, preferred, rejected) records from data.preferences."""
        assert self.roles is not None and self.roles.local_engine is not None
        world = self.roles.learners.world
        n = (self.cfg.learner.batch_size // world) * world
        return preference_batch(self.roles.local_engine, *self.roles.data.next_preferences(n), self._seed())

    def _make_batch(self) -> tuple[TrainBatch | None, dict[str, float]]:
        """Sample, score and select according to the mode; returns the learner's batch."""
        if self.roles is not None and self.roles.data.preferences is not None:
            return self._preference_batch()
        assert self.roles is not None and self.roles.pool is not None
        cfg, ro, pool = self.cfg, self.cfg.rollout, self.roles.pool
        world = self.roles.learners.world
        gen0 = pool.stats.seconds  # generation time of this batch, for the step's stage split
        prompts = self.roles.data.next_prompts(ro.prompts_per_step)
        first_group = self.produced * ro.prompts_per_step
        self.produced += 1
        n = ro.num_seeds if cfg.run.mode != "grpo" else ro.keep
        group_ids = [first_group + i for i in range(len(prompts)) for _ in range(n)]
        seeds = [self._seed() for _ in group_ids]
        flat_prompts = [p for p in prompts for _ in range(n)]
        metrics: dict[str, float] = {}
        if cfg.run.mode == "grpo":
            roll = pool.generate(
                flat_prompts, seeds, group_ids, steps=ro.final_steps, precision=ro.final_precision,
                return_trajectory=True, noise_level=cfg.loss.grpo.noise_level,
            )  # fmt: skip
            rew = self._score(roll, "final", metrics)
            steps = grpo_train_steps(roll, cfg.loss.grpo.train_fraction, self.rng)
            batch, m = advantage_batch(
                roll, rew, std=cfg.loss.adv_std, world=world, seed=self._seed(), train_steps=steps
            )
            return batch, {**metrics, **m, "time/generate_s": pool.stats.seconds - gen0}
        roll = pool.generate(
            flat_prompts, seeds, group_ids, steps=ro.preview_steps, precision=ro.preview_precision
        )
        rew = self._score(roll, "preview", metrics)
        if cfg.run.mode == "dpo":
            batch, m = dpo_batch(roll, rew, world=world, seed=self._seed())
            return batch, {**metrics, **m, "time/generate_s": pool.stats.seconds - gen0}
        keep = keep_seeds(roll, rew, keep=ro.keep, how=ro.selection, generator=self.rng)
        if keep.numel() == 0:  # every preview item failed scoring: nothing to regenerate or train
            return None, {**metrics, "trained_items": 0.0}
        if ro.two_stage:
            kept = roll.select(keep)
            roll = pool.generate(
                kept.prompts, kept.seeds.tolist(), kept.group_ids.tolist(),
                steps=ro.final_steps, precision=ro.final_precision,
            )  # fmt: skip
            rew = self._score(roll, "final", metrics)
        else:
            roll, rew = roll.select(keep), rew.select(keep)
        if self.replay is not None:
            metrics.update(self.replay.admit(roll, rew))
        batch, m = advantage_batch(roll, rew, std=cfg.loss.adv_std, world=world, seed=self._seed())
        return batch, {**metrics, **m, "time/generate_s": pool.stats.seconds - gen0}

    def _score(self, roll: Rollouts, stage: str, metrics: dict[str, float]) -> Rewards:
        assert self.roles is not None
        t0 = time.perf_counter()
        rew = self.roles.rewards.score(roll)
        metrics.update(reward_metrics(roll, rew, stage))
        metrics[f"time/score_{stage}_s"] = time.perf_counter() - t0
        self.counters.seen_items += len(roll)
        if bad := int((~rew.ok).sum()):
            self.counters.skip("reward_failed", bad)
        with self._log_lock:
            # the step these rollouts train (as metrics.jsonl counts), so a restore's drop_after(step)
            # removes exactly the rows of the steps that run again
            self.roles.rollout_log.append(roll, rew, stage=stage, step=self.step + 1)
            ok = rew.ok
            self.roles.metrics.log_histogram(f"{stage}/reward_hist", rew.total[ok].numpy())
            for name, vals in rew.per_scorer.items():
                self.roles.metrics.log_histogram(f"{stage}/{name}_hist", vals[ok].numpy())
        return rew

    # ---------------------------------------------------------------- sync, eval, checkpoints
    def _finish(self) -> tuple[dict[str, float], bool | None]:
        """After the last step: evaluate, prove the generators hold the final weights, checkpoint, export."""
        assert self.roles is not None
        if self.step > 0:  # redone after a restore: the first try's "after" rows must not stay twice
            self.roles.rollout_log.drop_stage("eval", self.step)
            self.roles.metrics.drop_prefix("eval/", self.step)
        after = self._evaluate("after")
        in_sync = self.roles.weights_in_sync()
        self._checkpoint()
        self.roles.learners.export_diffusers(str(self.run_dir / "export"))
        return after, in_sync

    def _sync(self, rewind: bool = False) -> None:
        assert self.roles is not None
        self.version = self.roles.sync_weights(rewind=rewind)

    def _evaluate(self, tag: str) -> dict[str, float]:
        assert self.roles is not None
        if self.roles.pool is None:
            self._sync()
        ev = self.cfg.eval
        prompts = self.roles.data.eval_prompts(ev.num_prompts)
        flat = [p for p in prompts for _ in range(ev.seeds_per_prompt)]
        seeds = [ev.seed + i for i in range(len(flat))]
        groups = [i // ev.seeds_per_prompt for i in range(len(flat))]
        roll = self.roles.sample_eval(flat, seeds, groups, steps=ev.steps)
        out: dict[str, float] = {}
        if self.roles.rewards.available:
            # update=False: scoring the evaluation must not move the normaliser training rollouts use
            rew = self.roles.rewards.score(roll, update=False)
            ok = rew.ok  # raw scores: the normalised total depends on the run's reward statistics
            for name, vals in {**rew.per_scorer, **rew.extras}.items():
                out[name] = float(vals[ok].mean()) if ok.any() else float("nan")
            with self._log_lock:
                self.roles.rollout_log.append(roll, rew, stage="eval", step=self.step)
        self.roles.metrics.log(self.step, {f"eval/{k}": v for k, v in out.items()})
        self.roles.save_grid(roll.images, roll.prompts, self.run_dir / "samples" / f"{tag}.png")
        return out

    def _seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.rng))

    def _check_skip_rate(self) -> None:
        c, limit = self.counters, self.cfg.run.max_skip_rate
        step_rate = c.skipped_steps / max(self.step, 1)
        item_rate = c.skipped_items / max(c.seen_items, 1)
        if self.step >= 4 and (step_rate > limit or item_rate > limit):
            self._checkpoint_if_possible()
            raise RunFailed(
                f"skip rate over run.max_skip_rate={limit}: steps {step_rate:.0%}, items {item_rate:.0%} "
                f"(causes: {c.reasons})"
            )

    def _checkpoint_if_possible(self) -> None:
        try:
            self._checkpoint()
        except Exception:  # the run is already failing; keep the first error
            log.exception("could not write a checkpoint while stopping")

    def _checkpoint(self) -> None:
        """checkpoints/step-N: the learner ranks' shards, controller.json, replay.pt; written beside and
        renamed into place with its COMPLETE marker, so a half-written checkpoint is never resumed from."""
        assert self.roles is not None
        root = self.run_dir / "checkpoints"
        final = root / f"step-{self.step:07d}"
        if is_complete(final):
            return
        with atomic_dir(final) as tmp:
            self.roles.learners.save(str(tmp / "learner"))
            (tmp / "controller.json").write_text(json.dumps(self._state()))
            if self.replay is not None:
                torch.save(self.replay.state(), tmp / "replay.pt")
            with self._log_lock:  # rows of the steps this checkpoint covers must outlive a killed driver
                self.roles.rollout_log.flush()
        prune(root, self.cfg.run.keep_checkpoints)

    def _state(self) -> dict[str, Any]:
        """The controller's part of a checkpoint: position, RNG, data, reward statistics, counters."""
        assert self.roles is not None
        return {
            "step": self.step,
            "version": self.version,
            "rng": self.rng.get_state().tolist(),
            "data": self.roles.data.state(),
            "rewards": self.roles.rewards.state(),
            "counters": _asdict(self.counters),
            "produced": self.produced,
            # Async: undelivered rollouts are not saved; the record says how many were discarded.
            "buffer": _asdict(self._producer.buffer.state(keep_items=False)) if self._producer else None,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        assert self.roles is not None
        self.step, self.version = int(state["step"]), int(state["version"])
        self.rng.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
        self.roles.data.load_state(state["data"])
        self.roles.rewards.load_state(state["rewards"])
        self.counters = Counters(**state["counters"])
        self.produced = int(state.get("produced", self.step))

    def _restore(self, ckpt: Path | None) -> None:
        """Rewinds the run to checkpoint `ckpt`; None: to before step 1 (the learners, restarted, already
        hold model.pretrained)."""
        assert self.roles is not None
        if ckpt is None:
            assert self._first_state is not None, "no checkpoint to restore from"
            self._load_state(self._first_state)
        else:
            self.roles.learners.load(str(ckpt / "learner"))
            self._load_state(json.loads((ckpt / "controller.json").read_text()))
        if self.replay is not None:
            if ckpt is not None and (ckpt / "replay.pt").exists():
                self.replay.load_state(torch.load(ckpt / "replay.pt"))
            else:  # the run's start, or a checkpoint from before replay was on, holds none
                self.replay.clear()
        self.roles.rollout_log.drop_after(self.step)  # the steps after the checkpoint run again
        self.roles.metrics.drop_after(self.step)
        log.info("resumed from %s at step %d", ckpt, self.step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose COMPLETE marker exists; temp folders are never returned."""
    return latest_complete(run_dir / "checkpoints")


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(obj)
