"""LoRA adapters on the Sana DiT through peft, and merging them back into plain SanaDiT weights.

With LoRA only the adapters train; the learner keeps the old (EMA) and reference policies as copies of
the adapters alone, never as extra model copies (the reference is the zero-initialised-B adapter, which
is exactly the base model). Rollout snapshots and exports carry merged weights under SanaDiT's own
names, so generators and diffusers never see peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

# Sol-RL's Sana LoRA targets (configs/sol_rl/sana.py in NVlabs/Sana): all attention projections.
SOL_RL_TARGETS: tuple[str, ...] = (
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
)
ADAPTER = "default"


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning."""

    enabled: bool = False
    rank: int = field(default=32, metadata={"ge": 1})
    alpha: int = field(default=64, metadata={"ge": 1})
    """Scale alpha/rank on the adapter's output."""
    target_modules: list[str] = field(default_factory=lambda: list(SOL_RL_TARGETS))
    """Module-name suffixes that get an adapter (every match must be an nn.Linear)."""
    init: Literal["gaussian", "kaiming"] = "gaussian"
    """Initialisation of A (B starts at zero either way, so step 0 is the base model). Sol-RL: gaussian."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject adapters in place (before sharding); only adapter weights stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
    )
    try:
        model = inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules: {exc}") from None
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora.target_modules: {cfg.target_modules} matched no module")
    return model


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full peft state dict -> plain weights: W + scale·B@A under the base layer's own name.

    >>> merged = merge_lora(model_state, cfg.scale)  # 'blocks.0.attn.qkv.weight', no lora_* keys
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, leaf = key.split(".base_layer.")
        if leaf == "weight":
            a = state[f"{prefix}.lora_A.{ADAPTER}.weight"]  # [r, in]
            b = state[f"{prefix}.lora_B.{ADAPTER}.weight"]  # [out, r]
            delta = (b.float() @ a.float()) * scale  # [out, in], fp32 so bf16 adapters merge without loss
            value = (value.float() + delta).to(value.dtype)
        out[f"{prefix}.{leaf}"] = value
    return out


__all__ = ["ADAPTER", "SOL_RL_TARGETS", "LoRAConfig", "apply_lora", "merge_lora"]
