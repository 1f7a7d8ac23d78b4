"""Rectified-flow schedules, ODE/SDE steps and the sampler (DESIGN.md section 3).

Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0 at timestep
sigma * 1000, sampling runs sigma from 1 to 0. All step functions are pure and work in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


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


@dataclass(kw_only=True, slots=True)
class SampleResult:
    """What `sample` returns; the trajectory fields are what GRPO trains on."""

    x0: Tensor  # float32 [N, C, h, w] final (clean) latents
    trajectory: Tensor | None  # float32 [N, S+1, C, h, w] latents at sigmas[0..S]; [:, 0] is the noise
    sigmas: Tensor  # float32 [S+1] from 1 to 0
    log_probs: Tensor | None  # float32 [N, S] log p(x_{i+1} | x_i); 0 on ODE steps
    sde_mask: Tensor  # bool [S] steps taken with the SDE (the trainable ones)


class VelocityModel(Protocol):
    """Anything called like `SanaDiT.forward` (the policy, its quantized rollout copy, a test double)."""

    def __call__(self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor, /) -> Tensor: ...


def shifted_sigmas(steps: int, shift: float) -> Tensor:
    """float32 [steps+1] from 1 to 0: uniform sigmas mapped by sigma' = s*sigma / (1 + (s-1)*sigma)."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift: must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def _per_sample(value: float | Tensor, x: Tensor) -> Tensor:
    """A scalar or a per-sample [B] sigma as a float32 tensor broadcastable against x [B, ...]."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t
    if t.shape != (x.shape[0],):
        raise ValueError(f"sigma: expected a scalar or [{x.shape[0]}], got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


def ode_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Euler step of the probability-flow ODE: x + (sigma_next - sigma) * v."""
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * v


def _sde_mean_std(
    x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, noise_level: float
) -> tuple[Tensor, Tensor]:
    # Flow-GRPO (arXiv 2505.05470, eq. 9 and its reference code): the reverse SDE with the same marginals
    # as the ODE, discretised with Euler-Maruyama. At sigma = 1 the 1 - sigma denominator would be 0; the
    # reference code uses sigma_1 there, which is the first step's sigma_next.
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = s_next - s
    std_t = noise_level * torch.sqrt(s / (1 - torch.where(s >= 1, s_next, s)))
    x, v = x.float(), v.float()
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * torch.sqrt(-dt)


def _gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) averaged over all but the batch dim; 0 where std = 0 (a deterministic step)."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def sde_step(
    x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, noise_level: float, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Flow-GRPO SDE step (DESIGN.md section 3).

    Returns x_next float32 [B, ...], log_prob float32 [B] (of x_next under the step's Gaussian, averaged over
    latent elements), mean float32 [B, ...] and std (the Gaussian's std, std_i*sqrt(-dt), broadcastable).
    noise_level 0 gives the Euler ODE step with log_prob 0.
    """
    mean, std = _sde_mean_std(x, v, sigma, sigma_next, noise_level)
    x_next = mean + std * noise.float()
    return x_next, _gaussian_log_prob(x_next.detach(), mean, std), mean, std


def sde_log_prob(
    x_next: Tensor,
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Re-score a stored transition x -> x_next under velocity v: (log_prob [B], mean, std).

    sigma / sigma_next may be per-sample [B] so that one batch mixes different steps. Differentiable in v.
    """
    mean, std = _sde_mean_std(x, v, sigma, sigma_next, noise_level)
    return _gaussian_log_prob(x_next, mean, std), mean, std


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], generator_device: str = "cpu") -> Tensor:
    """float32 [N, *shape] standard normal, row i drawn from its own generator seeded with seeds[i], so a
    sample's noise does not depend on which other samples share its batch. Drawn on `generator_device`
    (CPU by default: the same bits on every machine)."""
    out = torch.empty((len(seeds), *shape), device=generator_device)
    for i, seed in enumerate(seeds):
        g = torch.Generator(device=generator_device)
        g.manual_seed(int(seed))
        out[i] = torch.randn(shape, generator=g, device=generator_device)
    return out


def _step_seeds(seeds: Sequence[int], step: int) -> list[int]:
    # The SDE noise of (seed, step) gets its own stream: independent of the batch, of the SDE window and of
    # the initial noise, which stays the plain `seeds` stream shared with ODE passes of other step counts.
    mask = (1 << 63) - 1
    return [((int(s) * 0x9E3779B97F4A7C15) ^ ((step + 1) * 0xBF58476D1CE4E5B9)) & mask for s in seeds]


def _sde_mask(cfg: SamplerConfig) -> Tensor:
    mask = torch.zeros(cfg.steps, dtype=torch.bool)
    if cfg.noise_level > 0:
        first, last = cfg.sde_window if cfg.sde_window is not None else (0, cfg.steps)
        if not 0 <= first < last <= cfg.steps:
            raise ValueError(f"sde_window: need 0 <= first < last <= steps={cfg.steps}, got {cfg.sde_window}")
        mask[first:last] = True
    return mask


def _with_uncond(
    text: Tensor, mask: Tensor, uncond_text: Tensor | None, uncond_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """[2N, L, Dc] text and [2N, L] mask: the prompts, then the unconditional prompt, padded to one length."""
    n = text.shape[0]
    if uncond_text is None or uncond_mask is None:
        raise ValueError("uncond_text: required (with uncond_mask) when guidance_scale != 1")
    if uncond_text.shape[0] not in (1, n) or uncond_text.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"uncond_text: expected [1 or {n}, L, {text.shape[-1]}], got {tuple(uncond_text.shape)}"
        )
    if uncond_mask.shape != uncond_text.shape[:2]:
        raise ValueError(
            f"uncond_mask: expected {tuple(uncond_text.shape[:2])}, got {tuple(uncond_mask.shape)}"
        )
    length = max(text.shape[1], uncond_text.shape[1])
    texts, masks = [], []
    for t, m in ((text, mask), (uncond_text.expand(n, -1, -1), uncond_mask.expand(n, -1))):
        texts.append(F.pad(t, (0, 0, 0, length - t.shape[1])))
        masks.append(F.pad(m, (0, length - m.shape[1]), value=False))
    return torch.cat(texts).to(text.device), torch.cat(masks).to(text.device)


def drop_captions(captions: Sequence[str], p: float, seed: int) -> list[str]:
    """The training side of classifier-free guidance: each caption becomes the empty prompt (the one
    `sample` guides away from) with probability p, drawn from `seed` so a redone step drops the same ones."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption_dropout: expected a probability in [0, 1], got {p}")
    if p == 0.0:
        return list(captions)
    drop = torch.rand(len(captions), generator=torch.Generator().manual_seed(seed)) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]


@torch.no_grad()
def sample(
    model: VelocityModel,
    *,
    seeds: Sequence[int],
    text: Tensor,
    text_mask: Tensor,
    cfg: SamplerConfig,
    latent_shape: tuple[int, int, int],
    uncond_text: Tensor | None = None,
    uncond_mask: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Sample N latents from noise fixed by `seeds` (one per sample), sigma 1 -> 0 with `cfg.steps` steps.

    Classifier-free guidance (guidance_scale != 1) runs prompts and `uncond_text` ([1 or N, L', Dc]) as one
    batch and applies v = v_u + g (v_c - v_u) before each step. Steps inside `cfg.sde_window` (all steps
    when None) with noise_level > 0 are Flow-GRPO SDE steps whose noise also derives from the seed; the
    rest are Euler ODE steps. The same seed gives the same sample alone or in any batch.

    Example:
        out = sample(model, seeds=[0, 1], text=emb, text_mask=mask, cfg=SamplerConfig(steps=10),
                     latent_shape=(32, 32, 32))
    """
    n = len(seeds)
    if text.ndim != 3 or text.shape[0] != n:
        raise ValueError(f"text: expected [{n}, L, Dc] (one row per seed), got {tuple(text.shape)}")
    guided = cfg.guidance_scale != 1.0
    ctx, ctx_mask = _with_uncond(text, text_mask, uncond_text, uncond_mask) if guided else (text, text_mask)
    sigmas, sde_mask = shifted_sigmas(cfg.steps, cfg.shift), _sde_mask(cfg)
    x = seeded_noise(seeds, latent_shape).to(text.device)
    trajectory = [x] if return_trajectory else []
    log_probs = torch.zeros(n, cfg.steps, device=text.device)
    for i in range(cfg.steps):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x_in = torch.cat([x, x]) if guided else x
        t = torch.full((x_in.shape[0],), sigma * 1000.0, device=x.device)
        v = model(x_in, t, ctx, ctx_mask).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg.guidance_scale * (v_cond - v_uncond)
        if sde_mask[i]:
            noise = seeded_noise(_step_seeds(seeds, i), latent_shape).to(x.device)
            x, log_prob, _, _ = sde_step(x, v, sigma, sigma_next, cfg.noise_level, noise)
            log_probs[:, i] = log_prob
        else:
            x = ode_step(x, v, sigma, sigma_next)
        if return_trajectory:
            trajectory.append(x)
    return SampleResult(
        x0=x,
        trajectory=torch.stack(trajectory, dim=1) if return_trajectory else None,
        sigmas=sigmas,
        log_probs=log_probs if return_trajectory else None,
        sde_mask=sde_mask,
    )
