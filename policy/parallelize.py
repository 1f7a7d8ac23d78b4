"""FSDP2 for the Sana DiT: activation checkpointing and torch.compile per block, then `fully_shard` per
block and finally the root (the torchtitan order: AC, compile, FSDP); and the optimizer over those shards.

Mixed precision is FSDP2's: parameters are all-gathered in `param_dtype` for compute while the sharded
masters keep the model's own dtype (float32), gradients are reduce-scattered in `reduce_dtype`. The root
does not cast its inputs: the timestep (σ·1000) would lose its low digits in bf16, and the network already
casts latents and text to its compute dtype itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

DType = Literal["float32", "bfloat16", "float16"]

# Prefixes that wrappers insert into parameter names; checkpoints and snapshots use the bare names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """The parameter's name in the bare model: wrapper prefixes (AC, compile) removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def needs_fsdp(model: nn.Module, world_size: int, param_dtype: DType) -> bool:
    """Whether `fully_shard` has work to do: sharding over several ranks, or casting the float32 masters
    to a lower compute dtype. One rank computing in its masters' dtype skips it (as torchtitan does without
    a data-parallel shard dim): FSDP2 would only copy every parameter into its unsharded buffer before each
    forward and backward, measured at 22% of the tiny pretraining step on 2 CPU cores."""
    dtype = getattr(torch, param_dtype)
    return world_size > 1 or any(p.dtype != dtype for p in model.parameters() if p.is_floating_point())


def parallelize(
    model: nn.Module,
    mesh: torch.distributed.device_mesh.DeviceMesh,
    *,
    param_dtype: DType = "bfloat16",
    reduce_dtype: DType = "float32",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Shard `model` (anything with a `blocks` ModuleList) over `mesh` in place; returns it. On one rank
    with nothing to cast (`needs_fsdp`) only activation checkpointing and compile are applied.

    Every FSDP unit reshards after forward, the root included. The learner swaps the old and reference
    policies' values into the shards between forwards, which is only correct when no unit keeps an
    unsharded copy from the previous forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"parallelize: {type(model).__name__} has no `blocks` ModuleList to shard")
    wrap = needs_fsdp(model, mesh.size(), param_dtype)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            # No dropout or sampling inside a block: recomputation needs no saved RNG state.
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in blocks:
            block.compile(fullgraph=True)
    if not wrap:
        return model
    mp = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype)
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    root_mp = MixedPrecisionPolicy(
        param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, output_dtype=torch.float32,
        cast_forward_inputs=False,
    )  # fmt: skip
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=True)
    return model


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Optimizer and gradient clipping."""

    kind: Literal["adamw", "adafactor"] = "adamw"
    """adafactor: factored second moments and no first moment, O(rows + cols) state per matrix instead of
    AdamW's 2x the parameters (the memory saving Sana's CAME builds on)."""
    lr: float = field(default=3e-4, metadata={"gt": 0.0})
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW only."""
    weight_decay: float = field(default=1e-4, metadata={"ge": 0.0})
    eps: float = field(default=1e-8, metadata={"gt": 0.0})
    grad_clip: float = field(default=1.0, metadata={"ge": 0.0})
    """Max global gradient norm; 0 disables clipping (the norm is still checked for NaN/inf)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate shape after the warm-up: held, or decayed over `decay_steps` to lr·min_lr_ratio."""
    warmup_steps: int = field(default=0, metadata={"ge": 0})
    """Linear ramp from lr/warmup_steps up to lr over the first optimizer steps."""
    decay_steps: int = field(default=0, metadata={"ge": 0})
    """Optimizer steps the schedule spans, warm-up included; 0: the run's `run.steps` (set at load)."""
    min_lr_ratio: float = field(default=0.0, metadata={"ge": 0.0, "le": 1.0})
    """Where cosine and linear end, as a fraction of lr."""


def lr_at(cfg: OptimConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based). A pure function of the step, so a resumed
    run continues the schedule from its checkpoint's policy version with no scheduler state to save."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.decay_steps <= cfg.warmup_steps:  # load_recipe fills 0 in and refuses the rest
        raise ValueError(
            f"lr_at: a {cfg.schedule} schedule needs decay_steps > warmup_steps, got {cfg.decay_steps}"
        )
    span = cfg.decay_steps - cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.kind == "adafactor":
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)


def _replicated(t: torch.Tensor) -> torch.Tensor:
    """A reduction over a sharded dim leaves a pending (partial) DTensor: finish it so it can be stored."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor) and any(p.is_partial() for p in t.placements):
        return t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)
    return t


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) with an absolute learning rate, written with out-of-place ops so
    it runs on FSDP2's DTensor shards (torch.optim.Adafactor's in-place norms do not).

    The last two dims of a tensor are factored: row and column means of g² (EMA with β2_t = 1 - t^-0.8)
    estimate the second moment as row·colᵀ / mean(row); the update g/√v̂ is RMS-clipped to 1.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": 1e-30, "clip": 1.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                state["step"] = state.get("step", torch.zeros((), dtype=torch.float32)) + 1
                beta = 1.0 - float(state["step"]) ** -0.8  # weight on the running estimate
                sq = g * g + eps
                if g.dim() >= 2:
                    row, col = sq.mean(-1), _replicated(sq.mean(-2))
                    state["row"] = beta * state["row"] + (1 - beta) * row if "row" in state else row
                    state["col"] = (
                        _replicated(beta * state["col"] + (1 - beta) * col) if "col" in state else col
                    )
                    norm = _replicated(state["row"].mean(-1, keepdim=True))
                    # normalise before the outer product: row·col of two tiny means underflows to 0
                    v = (state["row"] / norm).unsqueeze(-1) * state["col"].unsqueeze(-2)
                else:
                    state["v"] = beta * state["v"] + (1 - beta) * sq if "v" in state else sq
                    v = state["v"]
                update = g / v.clamp(min=eps).sqrt()
                rms = _replicated(update.square().mean()).sqrt()
                update = update / torch.clamp(rms / group["clip"], min=1.0)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr)


__all__ = ["Adafactor", "DType", "OptimConfig", "build_optimizer", "clean_name", "lr_at", "parallelize"]
