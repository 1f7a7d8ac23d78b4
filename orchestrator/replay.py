"""Best-sample replay: a flow-matching term on the policy's own best regenerated samples, beside NFT.

Each Sol-RL step admits the `top_k` best regenerated samples of every prompt group (by one reward's raw
score, at least `min_score`) into a first-in-first-out buffer of `capacity`. The learner's optimizer step
then takes the gradient of the NFT loss plus `weight` times the flow-matching loss on `batch_size` samples
drawn from the buffer (self-imitation, as RAFT and SIL distil the best of N into the policy), and
`updates` more optimizer updates follow on replay alone. On the demo it damps NFT's drift toward drawing
extra objects while the reward still teaches (README).

    replay = ReplayBuffer(cfg.rollout.replay, score=cfg.rewards[0].name)
    replay.admit(rollouts, rewards)                      # after the final-precision pass is scored
    extra = replay.batch(replay_seed(run_seed, step), world)  # TrainBatch(kind="fm") or None
    if extra is not None: learners.forward_backward(extra)   # gradients accumulate with the NFT batch's
    ...  # then per k in 1..updates: forward_backward(replay.batch(replay_seed(run_seed, step, k), world))
         # and learners.optim_step(advance=False)

Pure: no Ray. The controller saves the buffer with its checkpoints (`state` / `load_state`), so a
resumed run trains on the same samples as an uninterrupted one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from actors.records import Rewards, Rollouts, TrainBatch
from policy.selection import top_per_group


@dataclass(kw_only=True, slots=True)
class ReplayConfig:
    """The recipe's `rollout.replay:` section (Sol-RL mode only); weight 0 turns it off."""

    weight: float = field(default=0.0, metadata={"ge": 0.0})
    """λ on the replayed samples' flow-matching loss, added to the NFT loss in the same optimizer step."""
    top_k: int = field(default=2, metadata={"ge": 1})
    """Samples admitted per prompt group and step: the best by `score`."""
    min_score: float = float("-inf")
    """Only samples whose raw score reaches this are admitted (the scorer's own units)."""
    score: str = ""
    """Which reward's raw score ranks and gates the samples; empty: the recipe's first reward."""
    capacity: int = field(default=128, metadata={"ge": 1})
    """Samples kept; the oldest leave first."""
    batch_size: int = field(default=64, metadata={"ge": 1})
    """Samples drawn (with replacement) from the buffer per optimizer step."""
    updates: int = field(default=0, metadata={"ge": 0})
    """Further optimizer updates per step on replay alone, each on a fresh draw, after the step's own
    (NFT + replay); the policy version still advances once per step."""

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class ReplayBuffer:
    """The admitted samples: clean latents, prompt embeddings and masks, oldest first."""

    def __init__(self, cfg: ReplayConfig, score: str) -> None:
        self.cfg, self.score = cfg, cfg.score or score
        self._lock = threading.Lock()  # asynchronous mode admits from the producer thread
        self._x0: list[torch.Tensor] = []  # float32 [C, h, w] each
        self._text: list[torch.Tensor] = []  # float32 [L, Dc] each
        self._mask: list[torch.Tensor] = []  # bool [L] each
        self._scores: list[float] = []
        self.admitted = 0
        """Samples admitted over the run (a counter for metrics; evicted ones included)."""

    def __len__(self) -> int:
        return len(self._x0)

    def admit(self, rollouts: Rollouts, rewards: Rewards) -> dict[str, float]:
        """Adds the best samples of each group of `rollouts`; returns metrics for the step's row."""
        if self.score not in rewards.per_scorer:
            raise KeyError(
                f"rollout.replay.score: no reward named {self.score!r} "
                f"(rewards: {', '.join(sorted(rewards.per_scorer))})"
            )
        raw = rewards.per_scorer[self.score]
        ok = rewards.ok & torch.isfinite(raw)
        idx = top_per_group(raw, rollouts.group_ids, ok, self.cfg.top_k, self.cfg.min_score)
        with self._lock:
            for i in idx.tolist():
                self._x0.append(rollouts.latents[i].float().clone())
                self._text.append(rollouts.text[i].clone())
                self._mask.append(rollouts.text_mask[i].clone())
                self._scores.append(float(raw[i]))
            drop = max(0, len(self._x0) - self.cfg.capacity)
            for items in (self._x0, self._text, self._mask, self._scores):
                del items[:drop]
            self.admitted += idx.numel()
            metrics = {"replay/admitted": float(idx.numel()), "replay/size": float(len(self))}
            if self._scores:  # an empty buffer has no mean score (a NaN would reach wandb)
                metrics["replay/score"] = sum(self._scores) / len(self._scores)
            return metrics

    def batch(self, seed: int, world: int) -> TrainBatch | None:
        """`batch_size` samples drawn with replacement (rounded down to a multiple of `world`), or None
        while the buffer is empty. The same seed and contents give the same batch."""
        n = (self.cfg.batch_size // world) * world
        with self._lock:
            if not self._x0 or n == 0:
                return None
            g = torch.Generator().manual_seed(seed)
            pick = torch.randint(0, len(self._x0), (n,), generator=g).tolist()
            return TrainBatch(
                kind="fm",
                policy_version=-1,
                x0=torch.stack([self._x0[i] for i in pick]),
                text=torch.stack([self._text[i] for i in pick]),
                text_mask=torch.stack([self._mask[i] for i in pick]),
                seed=seed,
                loss_weight=self.cfg.weight,
            )

    def state(self) -> dict[str, object]:
        """Everything a resumed run needs (tensors: save with torch.save)."""
        with self._lock:
            empty = len(self._x0) == 0
            return {
                "x0": None if empty else torch.stack(self._x0),
                "text": None if empty else torch.stack(self._text),
                "mask": None if empty else torch.stack(self._mask),
                "scores": list(self._scores),
                "admitted": self.admitted,
            }

    def clear(self) -> None:
        """Forget every sample (a run rewound to before its first checkpoint)."""
        self.load_state({"x0": None, "text": None, "mask": None, "scores": [], "admitted": 0})

    def load_state(self, state: dict[str, object]) -> None:
        with self._lock:
            x0, text, mask = state["x0"], state["text"], state["mask"]
            if x0 is None:
                self._x0, self._text, self._mask = [], [], []
            else:
                assert isinstance(x0, torch.Tensor) and isinstance(text, torch.Tensor)
                assert isinstance(mask, torch.Tensor)
                self._x0, self._text, self._mask = list(x0.unbind()), list(text.unbind()), list(mask.unbind())
            scores = state["scores"]
            assert isinstance(scores, list)
            self._scores = [float(s) for s in scores]
            self.admitted = int(state["admitted"])  # type: ignore[call-overload]


def replay_seed(run_seed: int, step: int, update: int = 0) -> int:
    """The draw of step `step` (1-based) for its `update`-th replay-only update (0: the step's own): a
    function of these alone, so neither the controller's generator (which the asynchronous producer
    thread uses) nor a resume moves it."""
    return (run_seed * 1_000_003 + step + update * 100_000_007) % (2**31 - 1)


__all__ = ["ReplayBuffer", "ReplayConfig", "replay_seed"]
