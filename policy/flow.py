"""Rectified-flow schedules, ODE/SDE steps and the sampler (DESIGN.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class SamplerConfig:
    """How a rollout or evaluation is sampled."""

    steps: int = field(default=10, metadata={"ge": 1})
    shift: float = field(default=3.0, metadata={"gt": 0.0})
    """Timestep shift s in sigma' = s*sigma / (1 + (s-1)*sigma)."""
    guidance_scale: float = field(default=1.0, metadata={"ge": 0.0})
    """Classifier-free guidance; 1.0 disables the unconditional pass."""
    noise_level: float = field(default=0.0, metadata={"ge": 0.0})
    """SDE noise level a (Flow-GRPO); 0 gives the deterministic ODE."""
    sde_window: tuple[int, int] | None = None
    """[first, last) step indices that use the SDE step; None with noise_level > 0 means all steps."""
