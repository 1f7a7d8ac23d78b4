"""The learner's objectives: how one micro-batch of a `TrainBatch` becomes gradients, per batch kind.

`fm` (SFT, pretraining, best-sample replay), `nft` (DiffusionNFT), `grpo` (Flow-GRPO) and `dpo`
(Diffusion-DPO) each evaluate the policies on their inputs, call the pure loss of policy/losses.py and
backpropagate `loss * weight`, returning the loss's metrics. The learner (actors/learner.py) owns the
model, its slots and the ranks, and reaches them here through `Policies`; every random draw comes from
`draws`, taken over the whole batch from its seed before the learner slices it, so R ranks compute what
one rank would.

Example (inside the learner, one micro-batch `sl` of the rank's shard):
    drawn = {k: v[:, lo:hi][:, sl] for k, v in draws(batch, loss_cfg).items()}
    metrics = OBJECTIVES[batch.kind](self, loss_cfg, shard, sl, drawn, weight)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from actors.records import TrainBatch
from policy import losses as L


class Policies(Protocol):
    """The learner's side: the trained policy's velocity (with grad) and a slot's (no grad)."""

    device: torch.device

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """float32 [B, C, H, W] of the trained weights at noise level sigma [B]."""
        ...

    def slot_velocity(
        self, slot: str, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The same for slot `slot` ("old", "ref"), no grad; None when the learner keeps no such slot."""
        ...


Drawn = dict[str, torch.Tensor]
"""A micro-batch's random draws from `draws`: "sigma" [K, b], "noise" [K, b, C, H, W]."""
Objective = Callable[[Policies, L.LossConfig, TrainBatch, slice, Drawn, float], L.Metrics]
"""(policies, loss config, the rank's shard, the micro-batch's slice of it, its draws, loss weight) -> metrics"""


def accumulate(into: L.Metrics, metrics: L.Metrics, weight: float) -> None:
    """into[k] += weight * metrics[k]: means over micro-batches, σ draws and steps."""
    for key, value in metrics.items():
        into[key] = into[key] + weight * value if key in into else weight * value


def draws(batch: TrainBatch, cfg: L.LossConfig) -> Drawn:
    """The batch's σ and ε for all B samples, [K, B, ...] (K draws per sample), from the batch seed."""
    g = torch.Generator().manual_seed(batch.seed)
    b, shape = len(batch), tuple(batch.x0.shape)
    if batch.kind == "grpo":  # steps of the recorded trajectory: nothing to draw
        return {}
    if batch.kind == "nft":
        k, s = cfg.nft.num_sigmas, cfg.nft.shift
        u = torch.rand(k, b, generator=g)
        sigma = s * u / (1 + (s - 1) * u)  # the sampler's timestep shift (DESIGN.md section 3)
    else:
        ln = cfg.dpo.sigma if batch.kind == "dpo" else cfg.fm.sigma
        k, sigma = 1, L.sample_sigmas_logit_normal(b, ln.mean, ln.std, g)[None]
    return {"sigma": sigma, "noise": torch.randn((k, *shape), generator=g)}


def fm(
    pol: Policies, cfg: L.LossConfig, shard: TrainBatch, sl: slice, drawn: Drawn, weight: float
) -> L.Metrics:
    x0, text, mask = shard.x0[sl], shard.text[sl], shard.text_mask[sl]
    sigma, noise = drawn["sigma"][0], drawn["noise"][0]
    v = pol.velocity(L.noised(x0, noise, sigma), sigma, text, mask)
    loss, metrics = L.flow_matching_loss(v, x0.to(v.device), noise.to(v.device))
    (loss * weight).backward()
    return metrics


def nft(
    pol: Policies, cfg: L.LossConfig, shard: TrainBatch, sl: slice, drawn: Drawn, weight: float
) -> L.Metrics:
    if shard.advantages is None:
        raise ValueError("nft batch needs advantages")
    d, c = pol.device, cfg.nft
    x0, text, mask = shard.x0[sl].to(d), shard.text[sl], shard.text_mask[sl]
    adv = shard.advantages[sl].to(d)
    k = drawn["sigma"].shape[0]
    out: L.Metrics = {}
    for j in range(k):
        sigma, noise = drawn["sigma"][j].to(d), drawn["noise"][j].to(d)
        xs = L.noised(x0, noise, sigma)
        v_old = pol.slot_velocity("old", xs, sigma, text, mask)
        v_ref = pol.slot_velocity("ref", xs, sigma, text, mask)
        v = pol.velocity(xs, sigma, text, mask)
        assert v_old is not None  # the learner keeps "old" for every nft batch
        loss, metrics = L.nft_loss(
            v, v_old, v_ref, x0, xs, sigma, adv,
            beta=c.beta, adv_clip=c.adv_clip, kl_weight=c.kl_weight,
        )  # fmt: skip
        (loss * weight / k).backward()
        accumulate(out, metrics, 1 / k)
    return out


def grpo(
    pol: Policies, cfg: L.LossConfig, shard: TrainBatch, sl: slice, drawn: Drawn, weight: float
) -> L.Metrics:
    from policy.flow import sde_log_prob

    c, d = cfg.grpo, pol.device
    if (
        shard.trajectory is None
        or shard.sigmas is None
        or shard.train_steps is None
        or shard.advantages is None
    ):
        raise ValueError("grpo batch needs trajectory, sigmas, train_steps and advantages")
    traj = shard.trajectory[sl].to(d)  # [b, S+1, C, H, W]
    text, mask = shard.text[sl], shard.text_mask[sl]
    adv = shard.advantages[sl].to(d).clamp(-c.adv_clip, c.adv_clip)
    use_is = c.is_correction and shard.log_probs is not None
    steps = [int(j) for j in shard.train_steps]
    out: L.Metrics = {}
    for j in steps:
        x, x_next = traj[:, j], traj[:, j + 1]
        sigma = shard.sigmas[j].expand(len(x)).to(d)
        sigma_next = shard.sigmas[j + 1].expand(len(x)).to(d)
        mean_ref = None
        v_ref = pol.slot_velocity("ref", x, sigma, text, mask)
        if v_ref is not None:
            mean_ref = sde_log_prob(x_next, x, v_ref, sigma, sigma_next, c.noise_level)[1][:, None]
        v = pol.velocity(x, sigma, text, mask)
        logp, mean, std = sde_log_prob(x_next, x, v, sigma, sigma_next, c.noise_level)
        std_bt = std.expand(x.shape[0], *([1] * (x.dim() - 1))).reshape(-1, 1)  # [b, 1]
        # Old = the BF16 policy at this version; the IS weight covers quantization and staleness.
        lp_roll = shard.log_probs[sl][:, j : j + 1].to(d) if use_is else None  # type: ignore[index]
        loss, metrics = L.grpo_loss(
            logp[:, None], logp.detach()[:, None], adv, clip_eps=c.clip_eps, kl_beta=c.kl_beta,
            mean_new=mean[:, None], mean_ref=mean_ref, std=std_bt,
            logp_rollout=lp_roll, is_cap=c.is_cap,
        )  # fmt: skip
        (loss * weight / len(steps)).backward()
        accumulate(out, metrics, 1 / len(steps))
    return out


def dpo(
    pol: Policies, cfg: L.LossConfig, shard: TrainBatch, sl: slice, drawn: Drawn, weight: float
) -> L.Metrics:
    if shard.x0_rejected is None:
        raise ValueError("dpo batch needs x0_rejected")
    b = sl.stop - sl.start
    xs, target, sigma = L.dpo_pair(shard.x0[sl], shard.x0_rejected[sl], drawn["noise"][0], drawn["sigma"][0])
    text, mask = torch.cat([shard.text[sl]] * 2), torch.cat([shard.text_mask[sl]] * 2)
    v_ref = pol.slot_velocity("ref", xs, sigma, text, mask)
    assert v_ref is not None  # the learner keeps "ref" for every dpo batch
    e_ref = L.velocity_error(v_ref, target.to(pol.device))
    e = L.velocity_error(pol.velocity(xs, sigma, text, mask), target.to(pol.device))
    loss, metrics = L.dpo_loss(e[:b], e_ref[:b], e[b:], e_ref[b:], cfg.dpo.beta_dpo)
    (loss * weight).backward()
    return metrics


OBJECTIVES: dict[str, Objective] = {"fm": fm, "nft": nft, "grpo": grpo, "dpo": dpo}
"""TrainBatch.kind -> its objective."""

__all__ = ["OBJECTIVES", "Objective", "Policies", "accumulate", "draws"]
