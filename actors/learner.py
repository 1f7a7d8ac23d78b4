"""The learner: one Ray actor per rank, all ranks one torch.distributed group, the DiT sharded with FSDP2.

The same learner serves RL (NFT, GRPO, DPO) and plain training (SFT, pretraining, `fm`): only the loss
(policy/losses.py) and the data differ. Endpoints are separate so that only the controller decides their
order: `forward_backward(batch)` (gradient accumulation over micro-batches of the rank's shard),
`optim_step()`, `state_for_rollout()`, `save(dir)`, `load(dir)`, `export_diffusers(dir)`.

Extra policies are kept as *slots*: copies of the trainable parameters sharded exactly like them,
swapped into the shards for a no-grad forward. "old" is DiffusionNFT's EMA policy; "ref" is the policy
as it was when the objective first ran (the KL anchor and DPO's reference). With LoRA the slots hold
adapter weights only. "old" moves after every optimizer update (the controller's step, one rollout
round, is DiffusionNFT's epoch: one update, more with best-sample replay's `updates`) and is what
`state_for_rollout` hands the generators under NFT. GRPO's old policy is the current BF16 one (ratio 1
at the first update); the truncated importance weight against the rollout's own log-probs covers the
quantized sampler and staleness. How each batch kind's micro-batch becomes gradients is in
actors/objectives.py; every random draw (σ, ε) comes from the batch seed over the *whole* batch before
it is sliced, so R ranks compute what one rank would. The controller reaches the ranks through
`LearnerGroup` (actors/learner_group.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from actors.base import RankActor
from actors.objectives import OBJECTIVES, accumulate, draws
from actors.records import Published, TrainBatch, WeightSnapshot
from orchestrator.weight_channel import WeightEndpoint
from orchestrator.weight_sync import put_snapshot
from policy import losses as L
from policy.autocast import Autocast, autocast_context
from policy.lora import LoRAConfig
from policy.parallelize import DType, OptimConfig, lr_at
from policy.sana import ModelConfig


@dataclass(kw_only=True, slots=True)
class LearnerConfig:
    """The recipe's `learner:` section."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    param_dtype: DType = "bfloat16"
    """Compute dtype of the all-gathered parameters; the sharded masters keep the model's dtype."""
    reduce_dtype: DType = "float32"
    """Dtype of the gradient reduce-scatter."""
    autocast: Autocast = "none"
    """Run the policy's matrix products and convolutions in bfloat16 under torch.autocast (weights, norms,
    the loss and cross-attention's softmax stay float32). For CPU learners, whose parameters FSDP keeps in
    float32: on a CPU with AVX512-BF16 a tiny-preset pretraining step took 0.25 s against 0.41 s; on one
    without, bfloat16 products are slower than float32 ones. `auto`: bfloat16 on a CPU with bf16
    instructions (AVX512-BF16, AMX), none elsewhere (policy/autocast.py)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations."""
    compile: bool = False
    """torch.compile each block."""
    micro_batch_size: int = field(default=4, metadata={"ge": 1})
    """Samples per forward/backward on a rank; a rank's shard is accumulated over micro-batches."""
    batch_size: int = field(default=8, metadata={"ge": 1})
    """SFT/pretraining: images per optimizer step (RL batch sizes come from the rollout section)."""
    num_threads: int = field(default=0, metadata={"ge": 0})
    """CPU intra-op threads per rank (0: torch's default); keeps co-located CPU ranks from oversubscribing."""
    timeout_s: float = field(default=600.0, metadata={"gt": 0.0})
    """Collective timeout: a step whose peer rank stopped answering fails after this long."""


def _shards(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard behind each (DTensor) parameter or slot tensor; in-place ops on it are seen by FSDP."""
    from torch.distributed.tensor import DTensor

    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


class Learner(RankActor, WeightEndpoint):
    """One rank of the learner. Created by LearnerGroup as the Ray actor `learner-rank{i}`. Rank 0 is also
    the source of the collective weight sync (`resources.weight_sync: collective`): every rank calls
    `weights_send`, which gathers `weights_snapshot` to rank 0 and broadcasts it from there."""

    def setup(
        self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, loss_cfg: L.LossConfig, seed: int
    ) -> int:
        """Build, (LoRA-)wrap and shard the policy, make the optimizer; returns the trainable parameter count."""
        from torch.distributed.device_mesh import init_device_mesh

        from policy.lora import apply_lora
        from policy.parallelize import build_optimizer, clean_name, parallelize
        from policy.sana import build_policy

        torch.manual_seed(seed)  # every rank builds the same initial weights before sharding
        torch.use_deterministic_algorithms(self.device.type == "cpu", warn_only=True)
        self.model_cfg, self.cfg, self.loss_cfg = model_cfg, learner_cfg, loss_cfg
        model: torch.nn.Module = build_policy(model_cfg)
        if learner_cfg.lora.enabled:
            model = apply_lora(model, learner_cfg.lora)
        model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.model = parallelize(
            model, mesh, param_dtype=learner_cfg.param_dtype, reduce_dtype=learner_cfg.reduce_dtype,
            activation_checkpointing=learner_cfg.activation_checkpointing, compile=learner_cfg.compile,
        )  # fmt: skip
        named = [(clean_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(self.params, learner_cfg.optim)
        self.slots: dict[str, list[torch.Tensor]] = {}
        self.version = 0
        self.skipped_steps = 0
        self.samples_seen = 0
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------------------------ policies (slots)
    def _ensure_slots(self, kind: str) -> None:
        wanted = (["old"] if kind == "nft" else []) + (["ref"] if self.loss_cfg.uses_reference(kind) else [])
        for name in wanted:
            if name not in self.slots:
                self.slots[name] = [p.detach().clone() for p in self.params]

    @contextmanager
    def _policy(self, slot: str | None) -> Iterator[None]:
        """Inside: the model computes with slot `slot`'s weights (None: the trained ones). No grad."""
        if slot is None:
            yield
            return
        live = _shards(self.params)
        with torch.no_grad():
            saved = [t.clone() for t in live]
            torch._foreach_copy_(live, _shards(self.slots[slot]))
            try:
                yield
            finally:
                torch._foreach_copy_(live, saved)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """float32 velocity [B, C, H, W] of the trained weights at noise level sigma [B]."""
        d = self.device
        with autocast_context(self.cfg.autocast, d):
            v = self.model(x.to(d), (sigma * 1000).to(d), text.to(d), mask.to(d))
        return v.float()

    def slot_velocity(
        self, slot: str, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The same for slot `slot`, no grad; None when this learner keeps no such slot."""
        if slot not in self.slots:
            return None
        with self._policy(slot), torch.no_grad():
            return self.velocity(x, sigma, text, mask)

    # ------------------------------------------------------------------------------ endpoints
    def forward_backward(self, batch: TrainBatch) -> dict[str, float]:
        """Accumulate gradients of the batch-mean loss over this rank's shard; returns rank-averaged metrics."""
        kind = batch.kind
        self._ensure_slots(kind)
        drawn_all = draws(batch, self.loss_cfg)
        objective = OBJECTIVES[kind]
        b = len(batch)
        lo, hi = self.rank * b // self.world_size, (self.rank + 1) * b // self.world_size
        shard = batch.shard(self.rank, self.world_size)
        n, mb = len(shard), self.cfg.micro_batch_size
        totals: L.Metrics = {}
        for start in range(0, n, mb):
            sl = slice(start, min(start + mb, n))
            weight = (sl.stop - sl.start) / n  # micro-batch means, weighted into the shard mean
            drawn = {k: v[:, lo:hi][:, sl] for k, v in drawn_all.items()}
            metrics = objective(self, self.loss_cfg, shard, sl, drawn, weight * batch.loss_weight)
            accumulate(totals, metrics, weight)
        self.samples_seen += b
        out = self._mean_over_ranks(totals)
        out["nonfinite_loss"] = 0.0 if math.isfinite(out["loss"]) else 1.0  # NaN on any rank spreads here
        return out

    def optim_step(self, advance: bool = True) -> tuple[int, dict[str, float]]:
        """Clip, check and apply the accumulated gradients; returns (policy_version, metrics).

        A non-finite gradient norm (a NaN/inf anywhere in the batch, on any rank: the norm is global) skips
        the update on every rank alike and is counted; the version only advances on a real update.
        `advance=False` is a further update within the same rollout round (best-sample replay's
        `updates`): the weights and the old policy move, the version and so the lr schedule do not.
        """
        from torch.distributed.tensor import DTensor

        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        grad_norm = float(norm)
        finite = bool(torch.isfinite(norm))
        if finite:
            lr = lr_at(self.cfg.optim, self.version)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.version += int(advance)
            if "old" in self.slots:  # follows every update, so NFT's next round starts with old ≈ θ
                nft = self.loss_cfg.nft
                decay = L.old_policy_decay(self.version, nft.decay_rate, nft.decay_max)
                L.ema_update_(_shards(self.slots["old"]), _shards(self.params), decay)
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return self.version, {
            "grad_norm": grad_norm,
            "skipped": 0.0 if finite else 1.0,
            "skipped_steps": float(self.skipped_steps),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

    def state_for_rollout(self) -> WeightSnapshot | None:
        """Full weights gathered to rank 0 on the CPU, SanaDiT names, LoRA merged (None on other ranks).

        With NFT the rollouts sample the old (EMA) policy, as DiffusionNFT and Sol-RL do.
        """
        state = self._full_state("old" if "old" in self.slots else None)
        return None if state is None else WeightSnapshot(policy_version=self.version, state=state)

    def publish_for_rollout(self) -> Published | None:
        """Collective: `state_for_rollout` put into Ray's object store by rank 0 itself (None on other ranks).
        Only the ref travels to the controller and on to the generators: at 1.6B that is 3.2 GB that no
        longer passes through the driver twice per sync."""
        snapshot = self.state_for_rollout()
        return None if snapshot is None else put_snapshot(snapshot)

    def weights_snapshot(self) -> WeightSnapshot | None:
        """The collective sync's snapshot: `state_for_rollout` (a fresh copy, so keeping it after the
        broadcast is safe from later steps)."""
        return self.state_for_rollout()

    def publish_retained(self) -> Published:
        """Rank 0: the last broadcast weights through the object store, for a generator that restarted after
        that broadcast (it was not in the group that received them)."""
        if self.weights_last_sent is None:
            raise RuntimeError("publish_retained: nothing was broadcast yet")
        return put_snapshot(self.weights_last_sent)

    def rollout_digest(self) -> tuple[int, str] | None:
        """Collective: (version, sha256 of the rollout weights) on rank 0, to prove a sync landed."""
        from actors.generator import state_digest

        snapshot = self.state_for_rollout()
        return None if snapshot is None else (snapshot.policy_version, state_digest(snapshot.state))

    def save(self, path: str) -> str:
        """Collective: sharded checkpoint of model, optimizer, slots, counters and RNG at `path`, atomically."""
        from policy.checkpoint import save_checkpoint

        meta = {
            "version": self.version, "skipped_steps": self.skipped_steps, "samples_seen": self.samples_seen,
            "world_size": self.world_size, "lora": self.cfg.lora.enabled,
        }  # fmt: skip
        slots = {k: dict(zip(self.names, v)) for k, v in self.slots.items()}
        save_checkpoint(
            Path(path), model=self.model, optimizer=self.optimizer, slots=slots, meta=meta, rank=self.rank
        )
        return path

    def load(self, path: str) -> int:
        """Collective: restore a checkpoint written by `save` (any world size); returns its policy version."""
        from policy.checkpoint import load_checkpoint, read_meta

        meta = read_meta(path)
        if meta["lora"] != self.cfg.lora.enabled:
            raise ValueError(
                f"{path}: lora={meta['lora']} checkpoint, learner has lora={self.cfg.lora.enabled}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.slots = {k: v for k, v in self.slots.items() if k in meta["slots"]}
        for name in meta["slots"]:
            self.slots.setdefault(name, [p.detach().clone() for p in self.params])
        slots = {k: dict(zip(self.names, v)) for k, v in self.slots.items()}
        load_checkpoint(path, model=self.model, optimizer=self.optimizer, slots=slots, rank=self.rank)
        self.version, self.skipped_steps = int(meta["version"]), int(meta["skipped_steps"])
        self.samples_seen = int(meta["samples_seen"])
        return self.version

    def export_diffusers(self, path: str) -> str:
        """Collective: the trained policy (LoRA merged) as a diffusers folder, written by rank 0."""
        from policy.checkpoint import export_diffusers

        state = self._full_state(None)
        if state is not None:
            export_diffusers(state, self.model_cfg.arch(), path)
        return path

    def counters(self) -> dict[str, int]:
        return {
            "version": self.version,
            "skipped_steps": self.skipped_steps,
            "samples_seen": self.samples_seen,
        }

    # ------------------------------------------------------------------------------ internals
    def _full_state(self, slot: str | None) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from policy.lora import merge_lora

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        with self._policy(slot):
            state = get_model_state_dict(self.model, options=opts)
            # Copied while the slot is swapped in: on one CPU rank without FSDP (`needs_fsdp`) the "gathered"
            # tensors are the parameters themselves, which leaving the swap restores to the trained weights.
            full = (
                {k: cast(torch.Tensor, v).detach().clone() for k, v in state.items()}
                if self.rank == 0
                else None
            )
        if full is None:
            return None
        return merge_lora(full, self.cfg.lora.scale) if self.cfg.lora.enabled else full

    def _mean_over_ranks(self, totals: L.Metrics) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(totals)
        packed = torch.stack([totals[k].float().to(self.device) for k in keys])
        if self.world_size > 1:
            dist.all_reduce(packed)
            packed /= self.world_size
        return dict(zip(keys, packed.tolist()))


__all__ = ["Learner", "LearnerConfig", "OptimConfig"]
