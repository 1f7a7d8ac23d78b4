"""Objectives against hand-computed values on tiny tensors, and one gradient step moving each the right way."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from orchestrator.schema import ConfigError, from_dict
from policy.losses import (
    LossConfig,
    dpo_loss,
    dpo_pair,
    ema_update_,
    flow_matching_loss,
    grpo_loss,
    nft_loss,
    noised,
    old_policy_decay,
    sample_sigmas_logit_normal,
    velocity_error,
)


def _sgd_lowers(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, lr: float) -> None:
    """One gradient step on x lowers loss_of(x)."""
    x = x.clone().requires_grad_(True)
    before = loss_of(x)
    (grad,) = torch.autograd.grad(before, x)
    assert grad.abs().sum() > 0
    after = loss_of((x - lr * grad).detach())
    assert after < before.detach()


# Two samples of two latent elements; NFT numbers worked out by hand in the comments.
X0 = torch.tensor([[1.0, 2.0], [1.0, 2.0]]).view(2, 2, 1, 1)
XS = torch.tensor([[0.5, 1.0], [0.5, 1.0]]).view(2, 2, 1, 1)
V = torch.tensor([[0.2, -0.4], [0.2, -0.4]]).view(2, 2, 1, 1)
SIGMA = torch.tensor([0.5, 0.5])


def test_nft_hand_computed() -> None:
    # sample 0, A=+5 -> r'=1: x0+ = xs - 0.5 v = [0.4, 1.2], diff [-0.6,-0.8]: mean sq 0.5 / mean abs 0.7
    # sample 1, A=-5 -> r'=0: v- = 2·0 - v, x0- = [0.6, 0.8], diff [-0.4,-1.2]: mean sq 0.8 / mean abs 0.8
    adv = torch.tensor([5.0, -5.0])
    loss, m = nft_loss(V, torch.zeros_like(V), torch.zeros_like(V), X0, XS, SIGMA, adv, beta=1.0, adv_clip=5.0,
                       kl_weight=0.5)  # fmt: skip
    policy = 5.0 * (0.5 / 0.7 + 0.8 / 0.8) / 2
    kl = (0.04 + 0.16) / 2  # mean of v² per sample, same for both
    assert m["policy_loss"].item() == pytest.approx(policy, rel=1e-6)
    assert m["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(policy + 0.5 * kl, rel=1e-6)
    # advantages beyond the clip map to the same r' as the clip itself
    loss_big, _ = nft_loss(V, torch.zeros_like(V), None, X0, XS, SIGMA, adv * 10, beta=1.0, adv_clip=5.0,
                           kl_weight=0.5)  # fmt: skip
    assert loss_big.item() == pytest.approx(policy, rel=1e-6)


def test_nft_gradient_step_lowers_loss_and_follows_advantage() -> None:
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xs = noised(x0, noise, sigma)
    v_old = noise - x0 + 0.3 * torch.randn_like(x0)
    adv = torch.tensor([2.0, -1.0, 0.5, -3.0])

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        return nft_loss(v, v_old, v_old, x0, xs, sigma, adv, beta=1.0, adv_clip=5.0, kl_weight=1e-4)[0]

    _sgd_lowers(loss_of, v_old, lr=1e-2)
    # a positive advantage pulls v toward the velocity that reconstructs x0, a negative one pushes away
    v = v_old.clone().requires_grad_(True)
    pos = torch.tensor([5.0, 5.0, 5.0, 5.0])
    (g_pos,) = torch.autograd.grad(nft_loss(v, v_old, None, x0, xs, sigma, pos, beta=1.0, adv_clip=5.0,
                                            kl_weight=0.0)[0], v)  # fmt: skip
    (g_neg,) = torch.autograd.grad(nft_loss(v, v_old, None, x0, xs, sigma, -pos, beta=1.0, adv_clip=5.0,
                                            kl_weight=0.0)[0], v)  # fmt: skip
    target = noise - x0
    assert velocity_error(v_old - 1e-2 * g_pos, target).mean() < velocity_error(v_old, target).mean()
    assert velocity_error(v_old - 1e-2 * g_neg, target).mean() > velocity_error(v_old, target).mean()


def test_old_policy_decay_and_ema_direction() -> None:
    assert old_policy_decay(0) == 0.0
    assert old_policy_decay(100) == pytest.approx(0.1)
    assert old_policy_decay(10_000) == 0.5
    old, new = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(old, new, old_policy_decay(0))  # decay 0: the old policy becomes θ
    assert torch.equal(old[0], torch.ones(3))
    old = [torch.zeros(3)]
    ema_update_(old, new, 0.25)  # decay is the weight kept on the old value
    assert torch.allclose(old[0], torch.full((3,), 0.75))
    with pytest.raises(ValueError, match="decay"):
        ema_update_(old, new, 1.5)


def test_grpo_hand_computed() -> None:
    lp_new = torch.tensor([[0.1], [-0.2]])
    lp_old = torch.zeros(2, 1)
    adv = torch.tensor([1.0, -1.0])
    # ratios e^0.1 = 1.105 and e^-0.2 = 0.819 are both clipped (eps 0.05): min(1.105, 1.05)·1 and
    # min(-0.819, -0.95) -> surrogate mean (1.05 - 0.95) / 2 = 0.05
    mean_new = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).view(2, 1, 2, 1, 1)
    std = torch.tensor([[0.5], [1.0]])
    loss, m = grpo_loss(lp_new, lp_old, adv, clip_eps=0.05, kl_beta=0.1, mean_new=mean_new,
                        mean_ref=torch.zeros_like(mean_new), std=std)  # fmt: skip
    kl = (1.0 / (2 * 0.25) + 2.0 / (2 * 1.0)) / 2  # mean sq / (2 std²) per sample
    assert m["policy_loss"].item() == pytest.approx(-0.05, abs=1e-6)
    assert m["clip_fraction"].item() == 1.0
    assert m["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(-0.05 + 0.1 * kl, rel=1e-5)


def test_grpo_truncated_importance_weight() -> None:
    lp_new, lp_old, adv = torch.tensor([[0.1], [-0.2]]), torch.zeros(2, 1), torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(
        lp_new, lp_old, adv, clip_eps=0.05, kl_beta=0.0, logp_rollout=torch.tensor([[0.5], [0.0]])
    )
    w0 = math.exp(-0.5)  # p_old / p_rollout for sample 0, under the cap
    assert loss.item() == pytest.approx(-(1.05 * w0 - 0.95) / 2, rel=1e-5)
    assert m["rollout_logp_mismatch"].item() == pytest.approx(0.25)
    loss, m = grpo_loss(lp_new, lp_old, adv, clip_eps=0.05, kl_beta=0.0, logp_rollout=torch.tensor([[-1.0], [0.0]]),
                        is_cap=2.0)  # fmt: skip
    assert loss.item() == pytest.approx(-(1.05 * 2.0 - 0.95) / 2, rel=1e-5)  # e^1 capped at 2
    assert m["is_capped_fraction"].item() == 0.5
    with pytest.raises(ValueError, match="kl_beta"):
        grpo_loss(lp_new, lp_old, adv, clip_eps=0.05, kl_beta=0.1)


def test_grpo_gradient_step_raises_logp_of_good_samples() -> None:
    lp_old = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]])
    adv = torch.tensor([1.0, -1.0])

    def loss_of(lp: torch.Tensor) -> torch.Tensor:
        return grpo_loss(lp, lp_old, adv, clip_eps=0.2, kl_beta=0.0)[0]

    _sgd_lowers(loss_of, lp_old, lr=0.1)
    lp = lp_old.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(lp), lp)
    assert (g[0] < 0).all() and (g[1] > 0).all()  # descent raises p(good), lowers p(bad)


def test_dpo_hand_computed_and_gradient_direction() -> None:
    ew, rw, el, rl = torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([0.6]), torch.tensor([0.4])
    loss, m = dpo_loss(ew, rw, el, rl, beta_dpo=10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)  # inside = -5·(-0.2 - 0.2)
    assert m["dpo_accuracy"].item() == 1.0 and m["dpo_margin"].item() == pytest.approx(2.0)

    errs = torch.tensor([0.5, 0.4])  # (winner, loser) errors of θ, starting at the reference's

    def loss_of(e: torch.Tensor) -> torch.Tensor:
        return dpo_loss(e[:1], rw, e[1:], rl, beta_dpo=10.0)[0]

    _sgd_lowers(loss_of, errs, lr=0.01)
    e = errs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(e), e)
    assert g[0] > 0 > g[1]  # descent lowers the winner's error and raises the loser's


def test_dpo_pair_shares_sigma_and_noise() -> None:
    torch.manual_seed(0)
    w, lo, eps = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    xs, target, s = dpo_pair(w, lo, eps, sigma)
    assert xs.shape == (6, 2, 2, 2) and torch.equal(s, torch.cat([sigma, sigma]))
    assert torch.allclose(xs[:3], noised(w, eps, sigma)) and torch.allclose(xs[3:], noised(lo, eps, sigma))
    assert torch.allclose(target[:3], eps - w) and torch.allclose(target[3:], eps - lo)
    # the exact velocity reaches zero error for both images of the pair
    assert torch.allclose(velocity_error(target, target), torch.zeros(6))


def test_flow_matching_hand_computed_and_gradient() -> None:
    x0 = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    noise = torch.tensor([3.0, 3.0]).view(1, 2, 1, 1)
    loss, m = flow_matching_loss(torch.zeros_like(x0), x0, noise)
    assert loss.item() == pytest.approx((4 + 1) / 2) and m["loss"].item() == loss.item()
    _sgd_lowers(lambda v: flow_matching_loss(v, x0, noise)[0], torch.zeros_like(x0), lr=0.1)


def test_logit_normal_sigmas() -> None:
    s1 = sample_sigmas_logit_normal(1000, 0.0, 1.0, torch.Generator().manual_seed(3))
    s2 = sample_sigmas_logit_normal(1000, 0.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.dtype == torch.float32
    assert (s1 > 0).all() and (s1 < 1).all()
    assert s1.median().item() == pytest.approx(0.5, abs=0.05)
    high = sample_sigmas_logit_normal(1000, 2.0, 0.5, torch.Generator().manual_seed(3))
    assert high.median().item() == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.03)


def test_loss_config_from_recipe_values() -> None:
    cfg = from_dict(LossConfig, {"adv_std": "group", "grpo": {"clip_eps": 0.2, "kl_beta": 0.0}}, "loss")
    assert cfg.grpo.clip_eps == 0.2 and cfg.adv_std == "group"
    assert not cfg.uses_reference("grpo") and cfg.uses_reference("dpo") and cfg.uses_reference("nft")
    assert not cfg.uses_reference("fm")
    with pytest.raises(ConfigError, match=r"loss\.nft\.beta"):
        from_dict(LossConfig, {"nft": {"beta": 0.0}}, "loss")
    with pytest.raises(ConfigError, match=r"loss\.dpo\.sigma\.std"):
        from_dict(LossConfig, {"dpo": {"sigma": {"std": -1.0}}}, "loss")
    with pytest.raises(ConfigError, match=r"loss\.adv_std"):
        from_dict(LossConfig, {"adv_std": "batch"}, "loss")
