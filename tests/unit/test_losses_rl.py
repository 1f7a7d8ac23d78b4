"""Each RL objective raises a programmatic reward on a tiny problem (pure torch, no Ray).

The "policy" is an elementwise affine velocity field v(x, σ) = w·x + b + c·σ over 8-element latents; samples
come from the flow sampler; the reward is the mean brightness of x0. A handful of NFT / GRPO / DPO updates
must raise the reward of fresh samples, as group-relative training is meant to.
"""

from __future__ import annotations

import torch

from policy.advantage import group_advantages
from policy.flow import sde_log_prob, sde_step, shifted_sigmas
from policy.losses import (
    dpo_loss,
    dpo_pair,
    ema_update_,
    grpo_loss,
    nft_loss,
    noised,
    old_policy_decay,
    sample_sigmas_logit_normal,
    velocity_error,
)

SHAPE = (2, 2, 2)  # C, H, W
GROUPS, G = 4, 8  # prompts (all the same here) x samples per prompt
SIGMAS = shifted_sigmas(4, 1.0)  # [1, .75, .5, .25, 0]


def _params() -> list[torch.Tensor]:
    return [torch.zeros(SHAPE, requires_grad=True) for _ in range(3)]  # w, b, c


def _v(p: list[torch.Tensor], x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    w, b, c = p
    return w * x + b + c * sigma.view(-1, 1, 1, 1)


def _reward(x0: torch.Tensor) -> torch.Tensor:
    return x0.flatten(1).mean(1)


@torch.no_grad()
def _ode(p: list[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    x = noise
    for i in range(len(SIGMAS) - 1):
        s = SIGMAS[i].expand(len(x))
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * _v(p, x, s)
    return x


def _eval(p: list[torch.Tensor]) -> float:
    return float(
        _reward(_ode(p, torch.randn(512, *SHAPE, generator=torch.Generator().manual_seed(99)))).mean()
    )


def _groups() -> torch.Tensor:
    return torch.arange(GROUPS).repeat_interleave(G)


def test_nft_raises_reward() -> None:
    torch.manual_seed(0)
    theta = _params()
    old = [t.detach().clone() for t in theta]
    opt = torch.optim.Adam(theta, lr=0.05)
    before = _eval(theta)
    for step in range(1, 16):
        x0 = _ode(old, torch.randn(GROUPS * G, *SHAPE))  # rollouts from the old policy
        adv = group_advantages(_reward(x0), _groups(), std="global").advantages
        sigma = torch.rand(len(x0)) * 0.9 + 0.05
        xs = noised(x0, torch.randn_like(x0), sigma)
        loss, _ = nft_loss(_v(theta, xs, sigma), _v(old, xs, sigma), None, x0, xs, sigma, adv, beta=1.0,
                           adv_clip=5.0, kl_weight=0.0)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update_(old, theta, old_policy_decay(step))
    assert _eval(theta) > before + 0.3


def test_grpo_raises_reward() -> None:
    torch.manual_seed(0)
    theta = _params()
    ref = [t.detach().clone() for t in theta]
    opt = torch.optim.Adam(theta, lr=0.05)
    before = _eval(theta)
    steps = len(SIGMAS) - 1
    for _ in range(15):
        with torch.no_grad():  # SDE rollouts keep every transition and its log-prob
            x = torch.randn(GROUPS * G, *SHAPE)
            traj, logps = [x], []
            for i in range(steps):
                s, sn = SIGMAS[i].expand(len(x)), SIGMAS[i + 1].expand(len(x))
                x, lp, _, _ = sde_step(x, _v(theta, x, s), s, sn, 0.7, torch.randn_like(x))
                traj.append(x)
                logps.append(lp)
        adv = group_advantages(_reward(x), _groups(), std="group").advantages
        logp_old = torch.stack(logps, 1)  # [B, T]
        for _ in range(2):  # two updates per rollout batch: the ratio moves off 1
            lp_new, means, means_ref, stds = [], [], [], []
            for i in range(steps):
                s, sn = SIGMAS[i].expand(len(x)), SIGMAS[i + 1].expand(len(x))
                lp, mean, std = sde_log_prob(traj[i + 1], traj[i], _v(theta, traj[i], s), s, sn, 0.7)
                mean_ref = sde_log_prob(traj[i + 1], traj[i], _v(ref, traj[i], s), s, sn, 0.7)[1]
                lp_new.append(lp)
                means.append(mean)
                means_ref.append(mean_ref.detach())
                stds.append(std.reshape(len(x), -1)[:, 0])
            loss, _ = grpo_loss(torch.stack(lp_new, 1), logp_old, adv, clip_eps=0.2, kl_beta=0.01,
                                mean_new=torch.stack(means, 1), mean_ref=torch.stack(means_ref, 1),
                                std=torch.stack(stds, 1))  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert _eval(theta) > before + 0.3


def test_dpo_raises_reward() -> None:
    torch.manual_seed(0)
    theta = _params()
    ref = [t.detach().clone() for t in theta]
    opt = torch.optim.Adam(theta, lr=0.05)
    before = _eval(theta)
    for _ in range(15):
        x0 = _ode(theta, torch.randn(GROUPS * G, *SHAPE)).view(GROUPS, G, *SHAPE)  # online: current policy
        r = _reward(x0.flatten(0, 1)).view(GROUPS, G)
        idx = torch.arange(GROUPS)
        win, lose = x0[idx, r.argmax(1)], x0[idx, r.argmin(1)]
        sigma = sample_sigmas_logit_normal(GROUPS, 0.0, 1.0)
        xs, target, s = dpo_pair(win, lose, torch.randn_like(win), sigma)
        e = velocity_error(_v(theta, xs, s), target)
        e_ref = velocity_error(_v(ref, xs, s), target).detach()
        loss, _ = dpo_loss(e[:GROUPS], e_ref[:GROUPS], e[GROUPS:], e_ref[GROUPS:], beta_dpo=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _eval(theta) > before + 0.3
