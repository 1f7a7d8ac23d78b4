"""Typed records that cross role boundaries (generator -> controller -> learner, learner -> generator).

Every rollout and every weight snapshot carries the `policy_version` that produced it; the controller
uses it to bound staleness (DESIGN.md section 1). Tensors are CPU tensors when they cross a boundary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch


@dataclass(kw_only=True, slots=True)
class Rollouts:
    """N samples from one generator call: G groups of samples of the same prompt."""

    policy_version: int
    precision: str
    """Weight format of the copy that sampled them: bf16, fp8, nvfp4, w4a16."""
    steps: int
    prompts: list[str]  # [N]
    group_ids: torch.Tensor  # int64 [N]; samples of one prompt share a group id
    seeds: torch.Tensor  # int64 [N]; the seed fixes the initial noise (and SDE noise)
    text: torch.Tensor  # float32 [N, L, Dc] prompt embeddings
    text_mask: torch.Tensor  # bool [N, L]
    latents: torch.Tensor  # float32 [N, C, h, w] final (clean) latents x0
    images: np.ndarray  # uint8 [N, H, W, 3] decoded
    # GRPO only: the SDE trajectory the sampler took.
    trajectory: torch.Tensor | None = None  # float32 [N, S+1, C, h, w] latents x_0..x_S (x_0 = noise)
    sigmas: torch.Tensor | None = None  # float32 [S+1] from 1 to 0
    log_probs: torch.Tensor | None = None  # float32 [N, S] log p(x_{i+1} | x_i) of the rollout policy
    sde_mask: torch.Tensor | None = None  # bool [S] steps that were SDE (trainable) steps
    seconds: float = 0.0
    """Wall time of the call that sampled them (a pool call: all replicas, retries included)."""

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: torch.Tensor) -> Rollouts:
        """The rollouts at `idx` (int64 [M]), in that order."""
        pick = idx.tolist()

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return Rollouts(
            policy_version=self.policy_version,
            precision=self.precision,
            steps=self.steps,
            prompts=[self.prompts[i] for i in pick],
            group_ids=self.group_ids[idx],
            seeds=self.seeds[idx],
            text=self.text[idx],
            text_mask=self.text_mask[idx],
            latents=self.latents[idx],
            images=self.images[pick],
            trajectory=take(self.trajectory),
            sigmas=self.sigmas,
            log_probs=take(self.log_probs),
            sde_mask=self.sde_mask,
            seconds=self.seconds,
        )

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        """Join rollouts of one policy version (e.g. from several generator replicas)."""
        versions = {p.policy_version for p in parts}
        if len(versions) != 1:
            raise ValueError(f"cannot mix policy versions {sorted(versions)} in one batch")
        first = parts[0]

        def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat([t for t in ts if t is not None])

        return Rollouts(
            policy_version=first.policy_version,
            precision=first.precision,
            steps=first.steps,
            prompts=[p for part in parts for p in part.prompts],
            group_ids=torch.cat([p.group_ids for p in parts]),
            seeds=torch.cat([p.seeds for p in parts]),
            text=torch.cat([p.text for p in parts]),
            text_mask=torch.cat([p.text_mask for p in parts]),
            latents=torch.cat([p.latents for p in parts]),
            images=np.concatenate([p.images for p in parts]),
            trajectory=cat([p.trajectory for p in parts]),
            sigmas=first.sigmas,
            log_probs=cat([p.log_probs for p in parts]),
            sde_mask=first.sde_mask,
            seconds=max(p.seconds for p in parts),  # replicas sample side by side
        )


@dataclass(kw_only=True, slots=True)
class Rewards:
    """Combined rewards for N rollouts; `ok` False marks items that must not be trained on."""

    total: torch.Tensor  # float32 [N] weighted, normalised combination
    per_scorer: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float32 [N] raw primary score
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # "scorer/sub" -> float32 [N]
    ok: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # bool [N]

    def select(self, idx: torch.Tensor) -> Rewards:
        return Rewards(
            total=self.total[idx],
            per_scorer={k: v[idx] for k, v in self.per_scorer.items()},
            extras={k: v[idx] for k, v in self.extras.items()},
            ok=self.ok[idx],
        )


@dataclass(kw_only=True, slots=True)
class TrainBatch:
    """What the learner trains on; which fields are set depends on `kind`."""

    kind: Literal["nft", "grpo", "dpo", "fm"]
    policy_version: int
    """Version of the policy that produced the rollouts (fm: -1, data from a dataset)."""
    x0: torch.Tensor  # float32 [B, C, h, w] clean latents (dpo: the preferred sample)
    text: torch.Tensor  # float32 [B, L, Dc]
    text_mask: torch.Tensor  # bool [B, L]
    advantages: torch.Tensor | None = None  # float32 [B] (nft, grpo)
    x0_rejected: torch.Tensor | None = None  # float32 [B, C, h, w] (dpo)
    trajectory: torch.Tensor | None = None  # float32 [B, S+1, C, h, w] (grpo)
    sigmas: torch.Tensor | None = None  # float32 [S+1] (grpo)
    log_probs: torch.Tensor | None = None  # float32 [B, S] rollout log-probs (grpo)
    train_steps: torch.Tensor | None = None  # int64 [T] step indices to train on (grpo)
    seed: int = 0
    """Seeds the learner's noise (sigma, epsilon) for this batch, so reruns are exact."""
    loss_weight: float = 1.0
    """Scales this batch's loss, and so its gradients, where several batches make one optimizer step
    (a replay batch beside the RL batch)."""

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def shard(self, rank: int, world: int) -> TrainBatch:
        """The rank's contiguous slice; every rank gets the same count (B divisible by world)."""
        b = len(self)
        if b % world:
            raise ValueError(f"batch of {b} does not split over {world} ranks")
        lo, hi = rank * b // world, (rank + 1) * b // world

        def cut(t: Any) -> Any:
            return t[lo:hi] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b else t

        return TrainBatch(
            kind=self.kind,
            policy_version=self.policy_version,
            x0=cut(self.x0),
            text=cut(self.text),
            text_mask=cut(self.text_mask),
            advantages=cut(self.advantages),
            x0_rejected=cut(self.x0_rejected),
            trajectory=cut(self.trajectory),
            sigmas=self.sigmas,
            log_probs=cut(self.log_probs),
            train_steps=self.train_steps,
            seed=self.seed * 1000 + rank,
            loss_weight=self.loss_weight,
        )


@dataclass(kw_only=True, slots=True)
class WeightSnapshot:
    """Full (unsharded) policy weights at one version, as the generator loads them."""

    policy_version: int
    state: dict[str, torch.Tensor]  # name -> CPU tensor, SanaDiT state-dict names


@dataclass(kw_only=True, slots=True)
class Published:
    """One snapshot in the object store: the ref every generator loads. Put by learner rank 0
    (`Learner.publish_for_rollout`, so the weights never pass through the driver) or by `WeightSync.publish`."""

    version: int
    ref: Any
    """ray.ObjectRef of a packed WeightSnapshot."""
    nbytes: int
    put_s: float


class _PackedState(dict[str, torch.Tensor]):
    """A state dict that pickles each tensor as a flat uint8 numpy array, which Ray stores out of band and
    maps zero-copy on the reader's side (~2-10 GB/s against ~0.3 GB/s for pickled tensors, bench/sync.py).
    The reader's tensors are read-only views of shared memory: load them (`load_state_dict` copies)."""

    def __reduce__(self) -> tuple[Any, ...]:
        names = list(self)
        metas = [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in self.values()]
        arrays = [t.reshape(-1).view(torch.uint8).numpy() for t in self.values()]
        return (_unpack_state, (names, metas, arrays))


def _unpack_state(
    names: list[str], metas: list[tuple[str, tuple[int, ...]]], arrays: list[np.ndarray]
) -> dict:
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": read-only by design
        for name, (dtype, shape), arr in zip(names, metas, arrays, strict=True):
            out[name] = torch.from_numpy(arr).view(getattr(torch, dtype)).reshape(shape)
    return out


def pack(snapshot: WeightSnapshot) -> WeightSnapshot:
    """The same snapshot with CPU, contiguous tensors in a state dict that travels as raw buffers."""
    state = _PackedState()
    for name, t in snapshot.state.items():
        state[name] = t.detach().to("cpu").contiguous()
    return WeightSnapshot(policy_version=snapshot.policy_version, state=state)


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
