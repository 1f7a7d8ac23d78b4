"""Training objectives (DESIGN.md section 4): DiffusionNFT, Flow-GRPO, Diffusion-DPO, flow matching.

Pure functions: tensors in (shape-commented), `(loss, metrics)` out; no Ray, no distributed code. The learner
runs the networks and feeds their outputs here. Conventions of the whole module: rectified flow
`x_σ = (1-σ)·x0 + σ·ε` with velocity `v = ε - x0`; a "per-sample" squared error is the mean over latent
elements; every loss is computed in float32 whatever the network's dtype; metrics are detached scalar
tensors (the learner turns them into floats once per step, so losses never force a device sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]  # name -> detached float32 scalar


# ----------------------------------------------------------------------------------------- config


@dataclass(kw_only=True, slots=True)
class LogitNormal:
    """σ = sigmoid(mean + std·n), n ~ N(0, 1): the SD3/Sana training distribution over noise levels."""

    mean: float = 0.0
    std: float = field(default=1.0, metadata={"gt": 0.0})


@dataclass(kw_only=True, slots=True)
class NFTConfig:
    """DiffusionNFT as Sol-RL trains it (arXiv 2509.16117; Sol-RL's Sana config for the defaults)."""

    beta: float = field(default=1.0, metadata={"gt": 0.0})
    """Strength β of the implicit positive/negative policies around the old policy."""
    adv_clip: float = field(default=5.0, metadata={"gt": 0.0})
    """A_max: advantages are clipped to ±A_max before mapping them to r' in [0, 1]."""
    kl_weight: float = field(default=1e-4, metadata={"ge": 0.0})
    """λ on the velocity KL ||v_θ - v_ref||² to the reference model; 0 drops the reference pass."""
    decay_rate: float = field(default=0.001, metadata={"ge": 0.0})
    """Old-policy EMA decay grows by this much per optimizer step ..."""
    decay_max: float = field(default=0.5, metadata={"ge": 0.0, "lt": 1.0})
    """... up to this cap: decay = min(decay_rate·step, decay_max)."""
    shift: float = field(default=3.0, metadata={"gt": 0.0})
    """σ is drawn as the sampler's shifted schedule: s·u / (1 + (s-1)·u), u ~ U(0, 1)."""
    num_sigmas: int = field(default=1, metadata={"ge": 1})
    """σ draws per sample per step, each its own forward/backward (Sol-RL trains every sampler step)."""


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    """Flow-GRPO (arXiv 2505.05470) defaults."""

    clip_eps: float = field(default=1e-4, metadata={"gt": 0.0, "lt": 1.0})
    """PPO clip range ε on the per-step probability ratio."""
    kl_beta: float = field(default=0.04, metadata={"ge": 0.0})
    """β on the Gaussian KL to the reference policy; 0 drops the reference pass."""
    adv_clip: float = field(default=5.0, metadata={"gt": 0.0})
    """Advantages are clipped to ±adv_clip."""
    noise_level: float = field(default=0.7, metadata={"gt": 0.0})
    """SDE noise level a; must equal the sampler's, or the recomputed log-probs are of another process."""
    is_correction: bool = True
    """Truncated importance weight between the rollout policy (possibly quantized) and the BF16 old policy."""
    is_cap: float = field(default=2.0, metadata={"ge": 1.0})
    """Cap on that importance weight."""
    train_fraction: float = field(default=1.0, metadata={"gt": 0.0, "le": 1.0})
    """Fraction of the SDE steps of each trajectory trained on (drawn at random per batch)."""


@dataclass(kw_only=True, slots=True)
class DPOConfig:
    """Diffusion-DPO (arXiv 2311.12908)."""

    beta_dpo: float = field(default=2500.0, metadata={"gt": 0.0})
    """β_dpo; the paper's SD1.5 value. Larger keeps the policy closer to the reference."""
    sigma: LogitNormal = field(default_factory=LogitNormal)
    """Distribution of the σ shared by the two images of a pair."""


@dataclass(kw_only=True, slots=True)
class FMConfig:
    """Flow matching for SFT and pretraining."""

    sigma: LogitNormal = field(default_factory=LogitNormal)
    caption_dropout: float = field(default=0.0, metadata={"ge": 0.0, "le": 1.0})
    """Share of captions replaced by the empty prompt, so the model also learns the unconditional
    velocity that classifier-free guidance (`sampler.guidance_scale`) steers away from."""


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The recipe's `loss:` section; the run's mode picks the objective, each objective has its section."""

    adv_std: Literal["group", "global"] = "global"
    """Advantage normaliser: per-group std, or the batch std with per-group means (Sol-RL: global)."""
    nft: NFTConfig = field(default_factory=NFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    fm: FMConfig = field(default_factory=FMConfig)

    def uses_reference(self, kind: str) -> bool:
        """Whether objective `kind` needs the reference policy (a KL term or DPO's implicit reward)."""
        return (
            kind == "dpo"
            or (kind == "nft" and self.nft.kl_weight > 0)
            or (kind == "grpo" and self.grpo.kl_beta > 0)
        )


# ---------------------------------------------------------------------------------------- helpers


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """float [B, ...] -> float32 [B]: mean over everything but the batch dim."""
    return x.float().flatten(1).mean(1)


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float [B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    return s.float().view(-1, *([1] * (like.dim() - 1)))


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1-σ)·x0 + σ·ε. x0, noise: float [B, C, H, W]; sigma: float [B] in [0, 1]."""
    s = _expand(sigma, x0)
    return (1 - s) * x0.float() + s * noise.float()


def velocity_error(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """e(m, x) = ||v_target - v_m(x_σ)||² per sample (mean over elements): float [N, ...] -> float32 [N]."""
    return _per_sample((v_target.float() - v_pred.float()) ** 2)


def sample_sigmas_logit_normal(
    n: int, mean: float, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """float32 [n] noise levels σ = sigmoid(mean + std·N(0, 1)), strictly inside (0, 1)."""
    z = torch.randn(n, generator=generator, dtype=torch.float32)
    return torch.sigmoid(mean + std * z)


# --------------------------------------------------------------------------------------- objectives


def flow_matching_loss(
    v_pred: torch.Tensor,  # float [B, C, H, W] network output at x_σ
    x0: torch.Tensor,  # float [B, C, H, W] clean latents
    noise: torch.Tensor,  # float [B, C, H, W] the ε that made x_σ
) -> tuple[torch.Tensor, Metrics]:
    """Rectified-flow MSE against the velocity target ε - x0 (SFT and pretraining)."""
    loss = velocity_error(v_pred, noise.float() - x0.float()).mean()
    return loss, {"loss": loss.detach()}


def nft_loss(
    v_theta: torch.Tensor,  # float [B, C, H, W] trained policy's velocity (requires grad)
    v_old: torch.Tensor,  # float [B, C, H, W] old (EMA) policy's velocity, no grad
    v_ref: torch.Tensor | None,  # float [B, C, H, W] reference velocity, no grad; None skips the KL
    x0: torch.Tensor,  # float [B, C, H, W] clean rollout latents
    x_sigma: torch.Tensor,  # float [B, C, H, W] noised x0 the velocities were computed at
    sigma: torch.Tensor,  # float [B]
    advantages: torch.Tensor,  # float [B]
    *,
    beta: float,
    adv_clip: float,
    kl_weight: float,
) -> tuple[torch.Tensor, Metrics]:
    """DiffusionNFT's negative-aware objective, as Sol-RL trains it (arXiv 2509.16117, eq. 9).

    The implicit positive policy `v+ = β·v_θ + (1-β)·v_old` is pulled to reconstruct high-reward samples
    and the implicit negative `v- = (1+β)·v_old - β·v_θ` to reconstruct low-reward ones; r' blends the
    two. Each reconstruction error is divided by its own (detached) mean absolute error, the paper's
    adaptive weighting, so easy and hard σ contribute alike.
    """
    v, old = v_theta.float(), v_old.detach().float()
    x0f, xs = x0.float(), x_sigma.float()
    s = _expand(sigma, x0f)
    a = advantages.float().clamp(-adv_clip, adv_clip)  # [B]
    r = (a / adv_clip / 2 + 0.5).clamp(0, 1)  # [B] r' in [0, 1]

    def recon(v_implicit: torch.Tensor) -> torch.Tensor:  # -> [B] adaptively weighted x0 error
        diff = xs - s * v_implicit - x0f
        with torch.no_grad():
            weight = _per_sample(diff.abs()).clamp(min=1e-5)
        return _per_sample(diff**2) / weight

    positive = recon(beta * v + (1 - beta) * old)  # [B]
    negative = recon((1 + beta) * old - beta * v)  # [B]
    policy = adv_clip * (r * positive / beta + (1 - r) * negative / beta).mean()
    metrics: Metrics = {
        "policy_loss": policy.detach(),
        "old_deviation": _per_sample((v - old) ** 2).mean().detach(),
    }
    loss = policy
    if v_ref is not None:
        kl = _per_sample((v - v_ref.detach().float()) ** 2).mean()
        loss = loss + kl_weight * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def old_policy_decay(step: int, rate: float = 0.001, cap: float = 0.5) -> float:
    """DiffusionNFT's old-policy decay `min(rate·step, cap)`: 0 at the start (old = θ), slower later."""
    return min(rate * max(step, 0), cap)


@torch.no_grad()
def ema_update_(old_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """In place: old ← decay·old + (1-decay)·θ (decay is the weight kept on the old policy)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if len(old_params) != len(params):
        raise ValueError(f"{len(old_params)} old tensors for {len(params)} parameters")
    old, new = list(old_params), [p.detach() for p in params]
    torch._foreach_mul_(old, decay)
    torch._foreach_add_(old, new, alpha=1.0 - decay)


def grpo_loss(
    logp_new: torch.Tensor,  # float [B, T] per-step log-probs under θ (requires grad)
    logp_old: torch.Tensor,  # float [B, T] under the BF16 old policy, no grad
    advantages: torch.Tensor,  # float [B] (already clipped)
    *,
    clip_eps: float,
    kl_beta: float,
    mean_new: torch.Tensor | None = None,  # float [B, T, C, H, W] SDE step mean under θ
    mean_ref: torch.Tensor | None = None,  # float [B, T, C, H, W] under the reference, no grad
    std: torch.Tensor | None = None,  # float [B, T] the step's Gaussian std (std_i·sqrt(-dt))
    logp_rollout: torch.Tensor | None = None,  # float [B, T] the (quantized) rollout policy's, no grad
    is_cap: float = 2.0,
) -> tuple[torch.Tensor, Metrics]:
    """Flow-GRPO's clipped surrogate plus β·KL to the reference (arXiv 2505.05470, eq. 8).

    With `logp_rollout`, each step is re-weighted by the truncated importance weight
    `min(p_old / p_rollout, is_cap)`: the samples came from the low-precision copy, not the BF16 old
    policy the ratio is taken against, and the cap bounds the variance that mismatch adds.
    """
    lp_new, lp_old = logp_new.float(), logp_old.detach().float()
    adv = advantages.float()[:, None]  # [B, 1]
    ratio = torch.exp(lp_new - lp_old)  # [B, T]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    metrics: Metrics = {
        "clip_fraction": ((ratio - 1).abs() > clip_eps).float().mean().detach(),
        "approx_kl_old": (0.5 * (lp_new - lp_old) ** 2).mean().detach(),
    }
    if logp_rollout is not None:
        log_w = lp_old - logp_rollout.detach().float()  # [B, T]
        weight = torch.exp(log_w).clamp(max=is_cap)
        metrics["is_weight"] = weight.mean().detach()
        metrics["is_capped_fraction"] = (torch.exp(log_w) > is_cap).float().mean().detach()
        metrics["rollout_logp_mismatch"] = log_w.abs().mean().detach()
        surrogate = weight * surrogate
    loss = -surrogate.mean()
    metrics["policy_loss"] = loss.detach()
    if kl_beta > 0:
        if mean_new is None or mean_ref is None or std is None:
            raise ValueError("grpo_loss: kl_beta > 0 needs mean_new, mean_ref and std")
        sq = (mean_new.float() - mean_ref.detach().float()) ** 2  # [B, T, C, H, W]
        kl = sq.flatten(2).mean(-1) / (2 * std.float() ** 2)  # [B, T] per-element Gaussian KL
        loss = loss + kl_beta * kl.mean()
        metrics["kl"] = kl.mean().detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def dpo_pair(
    x0_w: torch.Tensor,  # float [B, C, H, W] preferred
    x0_l: torch.Tensor,  # float [B, C, H, W] rejected
    noise: torch.Tensor,  # float [B, C, H, W] one ε per pair
    sigma: torch.Tensor,  # float [B] one σ per pair
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noised winners then losers with the SAME σ and ε within a pair, so the errors compare like for like.

    Returns x_σ float32 [2B, C, H, W], the velocity target ε - x0 float32 [2B, C, H, W] and σ [2B];
    split per-sample errors with `.chunk(2)` into (winners, losers).
    """
    x0 = torch.cat([x0_w, x0_l]).float()
    eps = torch.cat([noise, noise]).float()
    s = torch.cat([sigma, sigma]).float()
    return noised(x0, eps, s), eps - x0, s


def dpo_loss(
    err_theta_w: torch.Tensor,  # float [B] e(θ, winner), requires grad
    err_ref_w: torch.Tensor,  # float [B] e(ref, winner)
    err_theta_l: torch.Tensor,  # float [B] e(θ, loser), requires grad
    err_ref_l: torch.Tensor,  # float [B] e(ref, loser)
    beta_dpo: float,
) -> tuple[torch.Tensor, Metrics]:
    """Diffusion-DPO: `-log sigmoid(-β/2 · [(e(θ,w) - e(ref,w)) - (e(θ,l) - e(ref,l))])`, batch mean.

    Lowering the winner's error relative to the reference, or raising the loser's, lowers the loss.
    """
    d_w = err_theta_w.float() - err_ref_w.detach().float()
    d_l = err_theta_l.float() - err_ref_l.detach().float()
    inside = -0.5 * beta_dpo * (d_w - d_l)  # [B] implicit reward margin
    loss = -F.logsigmoid(inside).mean()
    return loss, {
        "loss": loss.detach(),
        "dpo_accuracy": (inside > 0).float().mean().detach(),
        "dpo_margin": inside.mean().detach(),
        "err_winner": err_theta_w.detach().float().mean(),
        "err_loser": err_theta_l.detach().float().mean(),
    }


__all__ = [
    "DPOConfig",
    "FMConfig",
    "GRPOConfig",
    "LogitNormal",
    "LossConfig",
    "Metrics",
    "NFTConfig",
    "dpo_loss",
    "dpo_pair",
    "ema_update_",
    "flow_matching_loss",
    "grpo_loss",
    "nft_loss",
    "noised",
    "old_policy_decay",
    "sample_sigmas_logit_normal",
    "velocity_error",
]
