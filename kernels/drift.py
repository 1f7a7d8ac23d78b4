"""How far a quantized rollout copy drifts from the full-precision policy (Sol-RL's premise, measured).

For the same seeds and prompts, `measure_drift` samples with both models and reports:
- per denoising step, the relative velocity error ||v_q - v|| / ||v|| at the states of the quantized
  rollout (the states a low-precision generator actually visits);
- the final-latent error between the two independent samples of each seed;
- with a reward function, the Spearman rank correlation of the two reward vectors: Sol-RL relies on an
  NVFP4 pass ranking seeds as BF16 would;
- on SDE steps (GRPO rollouts), the log-prob gap log p_q(x_{i+1} | x_i) - log p(x_{i+1} | x_i) of the
  quantized sampler's own transitions, both re-scored at the same states: the learner's importance ratio
  between rollout and policy is exp(-gap).

    report = measure_drift(policy, qpolicy, seeds=list(range(8)), text=emb, text_mask=mask,
                           cfg=SamplerConfig(steps=10), latent_shape=(32, 32, 32), reward_fn=score)
    print(report.summary())
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from policy.flow import SamplerConfig, VelocityModel, sample, sde_log_prob

RewardFn = Callable[[Tensor], Tensor]
"""Final latents float32 [N, C, h, w] -> rewards [N] (decode inside when the scorer wants pixels)."""


@dataclass(kw_only=True, slots=True)
class DriftReport:
    """Drift of a quantized copy against the full-precision policy over one batch of seeds."""

    sigmas: Tensor  # float32 [S+1], 1 -> 0
    sde_mask: Tensor  # bool [S], steps sampled with the SDE
    velocity_rel_err: Tensor  # float32 [N, S]: ||v_q - v|| / ||v|| at the quantized trajectory's states
    final_latent_rel_err: Tensor  # float32 [N]: ||x0_q - x0|| / ||x0||, same seed, independent trajectories
    logprob_gap: Tensor | None  # float32 [N, S]: log p_q - log p of the quantized transitions; 0 off-SDE
    rewards: Tensor | None  # float32 [N], full-precision samples
    rewards_quant: Tensor | None  # float32 [N], quantized samples
    reward_spearman: float | None
    """Rank correlation of `rewards` and `rewards_quant`; NaN if either is constant."""

    @property
    def mean_velocity_rel_err(self) -> float:
        return float(self.velocity_rel_err.mean())

    @property
    def mean_final_latent_rel_err(self) -> float:
        return float(self.final_latent_rel_err.mean())

    @property
    def mean_abs_logprob_gap(self) -> float | None:
        """Mean |log-prob gap| over SDE steps and samples; None without SDE steps."""
        if self.logprob_gap is None:
            return None
        return float(self.logprob_gap[:, self.sde_mask].abs().mean())

    def summary(self) -> str:
        steps = ", ".join(f"{e:.4f}" for e in self.velocity_rel_err.mean(dim=0).tolist())
        lines = [
            f"velocity rel. error per step: [{steps}] (mean {self.mean_velocity_rel_err:.4f})",
            f"final latent rel. error: {self.mean_final_latent_rel_err:.4f}",
        ]
        if self.mean_abs_logprob_gap is not None:
            lines.append(f"|log-prob gap| on SDE steps: {self.mean_abs_logprob_gap:.3e}")
        if self.reward_spearman is not None:
            lines.append(f"reward Spearman rho (quantized vs full): {self.reward_spearman:.3f}")
        return "\n".join(lines)


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of a 1-D tensor, ties sharing their average rank."""
    ranks = torch.empty(x.shape[0], dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(x.shape[0], dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors of equal length (NaN if either is constant)."""
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(
            f"spearman: need two 1-D tensors of one length, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    ra, rb = _average_ranks(a.detach().cpu()), _average_ranks(b.detach().cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _velocity(
    model: VelocityModel,
    x: Tensor,
    sigma: float,
    text: Tensor,
    text_mask: Tensor,
    guidance: float,
    uncond: tuple[Tensor, Tensor] | None,
) -> Tensor:
    # The sampler's velocity (after CFG), float32. Conditional and unconditional passes run as two calls
    # rather than one padded batch: equal up to float rounding, and independent of flow's batching.
    t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device)
    v = model(x, t, text, text_mask).float()
    if guidance == 1.0:
        return v
    if uncond is None:
        raise ValueError("uncond_text: required (with uncond_mask) when guidance_scale != 1")
    n = x.shape[0]
    v_u = model(x, t, uncond[0].expand(n, -1, -1), uncond[1].expand(n, -1)).float()
    return v_u + guidance * (v - v_u)


def _rel(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample ||a - b|| / ||b|| over all but the batch dim; 0 where both are 0."""
    diff = (a - b).flatten(1).norm(dim=1)
    return diff / b.flatten(1).norm(dim=1).clamp_min(1e-12)


@torch.no_grad()
def measure_drift(
    model: VelocityModel,
    qmodel: VelocityModel,
    *,
    seeds: Sequence[int],
    text: Tensor,
    text_mask: Tensor,
    cfg: SamplerConfig,
    latent_shape: tuple[int, int, int],
    uncond_text: Tensor | None = None,
    uncond_mask: Tensor | None = None,
    reward_fn: RewardFn | None = None,
) -> DriftReport:
    """Sample `seeds` with `model` (full precision) and `qmodel` (its rollout copy) and compare; see the
    module docstring. text [N, L, Dc], text_mask bool [N, L], one row per seed; `cfg` as for `sample`."""
    uncond = (uncond_text, uncond_mask) if uncond_text is not None and uncond_mask is not None else None
    run = functools.partial(
        sample,
        seeds=seeds,
        text=text,
        text_mask=text_mask,
        cfg=cfg,
        latent_shape=latent_shape,
        uncond_text=uncond_text,
        uncond_mask=uncond_mask,
    )
    full = run(model)
    quant = run(qmodel, return_trajectory=True)
    assert quant.trajectory is not None
    sigmas = quant.sigmas
    n, steps = len(seeds), cfg.steps
    vel_err = torch.zeros(n, steps)
    gap = torch.zeros(n, steps) if bool(quant.sde_mask.any()) else None
    for i in range(steps):
        x, x_next = quant.trajectory[:, i], quant.trajectory[:, i + 1]
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = _velocity(model, x, sigma, text, text_mask, cfg.guidance_scale, uncond)
        v_q = _velocity(qmodel, x, sigma, text, text_mask, cfg.guidance_scale, uncond)
        vel_err[:, i] = _rel(v_q, v).cpu()
        if gap is not None and quant.sde_mask[i]:
            lp, _, _ = sde_log_prob(x_next, x, v, sigma, sigma_next, cfg.noise_level)
            lp_q, _, _ = sde_log_prob(x_next, x, v_q, sigma, sigma_next, cfg.noise_level)
            gap[:, i] = (lp_q - lp).cpu()
    rewards = rewards_q = rho = None
    if reward_fn is not None:
        rewards, rewards_q = reward_fn(full.x0).float().cpu(), reward_fn(quant.x0).float().cpu()
        rho = spearman(rewards, rewards_q)
    return DriftReport(
        sigmas=sigmas.cpu(),
        sde_mask=quant.sde_mask.cpu(),
        velocity_rel_err=vel_err,
        final_latent_rel_err=_rel(quant.x0, full.x0).cpu(),
        logprob_gap=gap,
        rewards=rewards,
        rewards_quant=rewards_q,
        reward_spearman=rho,
    )
