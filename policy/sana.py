"""Sana DiT: configuration and network (DESIGN.md section 2).

The network body is written by the policy work; this header pins the configuration that recipes use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Preset = Literal["tiny", "0.6B", "1.6B", "4.8B"]


@dataclass(kw_only=True, slots=True)
class SanaConfig:
    """Architecture of one Sana DiT. Names follow diffusers' `SanaTransformer2DModel` where they map."""

    in_channels: int = 32
    """Latent channels (32 for DC-AE f32c32, 3 for the pixel codec)."""
    out_channels: int = 32
    hidden_size: int = 2240
    depth: int = 20
    head_dim: int = 32
    """Self-attention head dim; heads = hidden_size // head_dim."""
    cross_heads: int = 20
    caption_channels: int = 2304
    """Width of the text encoder's hidden states (Gemma-2-2B: 2304)."""
    mlp_ratio: float = 2.5
    patch_size: int = 1
    qk_norm: bool = False
    """RMSNorm on q and k (SANA 1.5)."""
    sample_size: int = 32
    """Latent side the checkpoint was trained at (diffusers config field; informational)."""
    norm_eps: float = 1e-6

    @staticmethod
    def preset(name: Preset) -> SanaConfig:
        return dataclasses.replace(PRESETS[name])


PRESETS: dict[str, SanaConfig] = {
    # Trains on a 2-core CPU: pixel-space shapes world with the MiniLM text encoder (384 channels).
    "tiny": SanaConfig(
        in_channels=3, out_channels=3, hidden_size=128, depth=4, cross_heads=4,
        caption_channels=384, patch_size=2, sample_size=32,
    ),
    "0.6B": SanaConfig(hidden_size=1152, depth=28, cross_heads=16),
    "1.6B": SanaConfig(hidden_size=2240, depth=20, cross_heads=20),
    "4.8B": SanaConfig(hidden_size=2240, depth=60, cross_heads=20, qk_norm=True),
}  # fmt: skip


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which policy to build: a preset, optional per-field overrides, optional local weights."""

    preset: Preset = "tiny"
    pretrained: str | None = None
    """Local diffusers-layout directory or original Sana .pth; never a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    overrides: dict[str, int | float | bool] = field(default_factory=dict)
    """Fields of SanaConfig to change from the preset, e.g. {depth: 2}."""

    def arch(self) -> SanaConfig:
        cfg = SanaConfig.preset(self.preset)
        for key, value in self.overrides.items():
            setattr(cfg, key, type(getattr(cfg, key))(value))
        return cfg

    def validate(self) -> None:
        names = {f.name for f in dataclasses.fields(SanaConfig)}
        for key in self.overrides:
            if key not in names:
                raise ValueError(f"overrides.{key}: not a SanaConfig field (known: {', '.join(sorted(names))})")
