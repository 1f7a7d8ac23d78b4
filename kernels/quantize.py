"""Quantized rollout copies of the policy (DESIGN.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Format = Literal["bf16", "fp8", "nvfp4", "w4a16"]


@dataclass(kw_only=True, slots=True)
class QuantConfig:
    """Which Linears of the rollout copy are quantized, and how."""

    fmt: Format = "nvfp4"
    skip_patterns: list[str] = field(
        default_factory=lambda: ["x_embedder", "t_embedder", "t_block", "caption_projection", "final_layer", r"\.attn\.qkv$"]
    )
    """Module-name regexes left in BF16 (embedders, final layer, attention qkv: Sol-RL's choice)."""
    min_dim: int = field(default=2240, metadata={"ge": 0})
    """Linears with max(in, out) <= min_dim stay in BF16."""
