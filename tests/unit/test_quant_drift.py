"""Rollout copies of the real tiny SanaDiT, and the drift measurement between them and the policy."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kernels.drift import DriftReport, measure_drift, spearman
from kernels.quantize import QuantConfig, QuantLinear, quantize_policy, requantize_
from policy.flow import SamplerConfig
from policy.sana import SanaConfig, SanaDiT

N = 6
LATENT = (3, 16, 16)


@pytest.fixture(scope="module")
def policy() -> SanaDiT:
    torch.manual_seed(0)
    model = SanaDiT(dataclasses.replace(SanaConfig.preset("tiny"), depth=2)).eval()
    # Sana zero-initialises the output layer (v = 0 at init): give it weights so that drift is visible.
    with torch.no_grad():
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
        for name, p in model.named_parameters():
            if "scale_shift_table" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(N, 8, dtype=torch.bool)
    mask[:, 6:] = False
    return torch.randn(N, 8, 384), mask


def _drift(
    model: torch.nn.Module, qmodel: torch.nn.Module, prompts: tuple[torch.Tensor, torch.Tensor], **kw: object
) -> DriftReport:
    sampler = SamplerConfig(steps=4, **kw)  # type: ignore[arg-type]
    text, mask = prompts
    return measure_drift(
        model,
        qmodel,
        seeds=list(range(N)),
        text=text,
        text_mask=mask,
        cfg=sampler,
        latent_shape=LATENT,
        reward_fn=lambda x0: x0[:, 0].mean(dim=(1, 2)),
    )


def test_sol_rl_defaults_on_the_tiny_preset(policy: SanaDiT) -> None:
    # Every tiny-preset Linear is <= 2240 wide: Sol-RL's size rule keeps them all in BF16.
    _, report = quantize_policy(policy, QuantConfig(fmt="nvfp4"))
    assert not report.replaced
    qmodel, report = quantize_policy(policy, QuantConfig(fmt="nvfp4", min_dim=0))
    replaced = {d.name for d in report.replaced}
    for i in range(2):
        expected = {"attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"}
        expected |= {"mlp.inverted_conv", "mlp.point_conv"}
        assert {f"blocks.{i}.{n}" for n in expected} <= replaced
        assert f"blocks.{i}.attn.qkv" not in replaced
    assert not any(
        n.startswith(("x_embedder", "t_embedder", "t_block", "caption_projection", "final_layer"))
        for n in replaced
    )
    assert all(isinstance(qmodel.get_submodule(n), QuantLinear) for n in replaced)


def test_requantize_a_sana_copy_in_place(policy: SanaDiT) -> None:
    qmodel, _ = quantize_policy(policy, QuantConfig(fmt="fp8", min_dim=0))
    storage = [t.data_ptr() for t in (*qmodel.parameters(), *qmodel.buffers())]
    state = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in policy.state_dict().items()
    }
    requantize_(qmodel, state)
    assert [t.data_ptr() for t in (*qmodel.parameters(), *qmodel.buffers())] == storage
    updated = SanaDiT(policy.cfg)
    updated.load_state_dict(state)
    fresh, _ = quantize_policy(updated, QuantConfig(fmt="fp8", min_dim=0))
    a, b = qmodel.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drift_orders_the_formats(policy: SanaDiT, prompts: tuple[torch.Tensor, torch.Tensor]) -> None:
    reports = {}
    for fmt in ("bf16", "fp8", "nvfp4"):
        qmodel, _ = quantize_policy(policy, QuantConfig(fmt=fmt, min_dim=0))  # type: ignore[arg-type]
        reports[fmt] = _drift(policy, qmodel, prompts)
    same = _drift(policy, policy, prompts)
    assert same.mean_velocity_rel_err == 0.0 and same.mean_final_latent_rel_err == 0.0
    assert same.reward_spearman == pytest.approx(1.0)
    vel = {f: r.mean_velocity_rel_err for f, r in reports.items()}
    lat = {f: r.mean_final_latent_rel_err for f, r in reports.items()}
    assert vel["nvfp4"] > vel["fp8"] > vel["bf16"] > 0
    assert lat["nvfp4"] > lat["fp8"] > 0
    r = reports["nvfp4"]
    assert r.velocity_rel_err.shape == (N, 4) and r.final_latent_rel_err.shape == (N,)
    assert r.sigmas.shape == (5,) and r.logprob_gap is None and r.mean_abs_logprob_gap is None
    assert r.rewards is not None and r.rewards_quant is not None and r.rewards.shape == (N,)
    assert r.reward_spearman is not None and -1.0 <= r.reward_spearman <= 1.0
    assert "velocity rel. error per step" in r.summary()


def test_sde_log_prob_gap(policy: SanaDiT, prompts: tuple[torch.Tensor, torch.Tensor]) -> None:
    gaps = {}
    for fmt in ("fp8", "nvfp4"):
        qmodel, _ = quantize_policy(policy, QuantConfig(fmt=fmt, min_dim=0))  # type: ignore[arg-type]
        report = _drift(policy, qmodel, prompts, noise_level=0.7, sde_window=(1, 3))
        assert report.logprob_gap is not None and report.logprob_gap.shape == (N, 4)
        assert report.sde_mask.tolist() == [False, True, True, False]
        assert torch.equal(report.logprob_gap[:, ~report.sde_mask], torch.zeros(N, 2))  # ODE steps
        gaps[fmt] = report.mean_abs_logprob_gap
    assert gaps["nvfp4"] is not None and gaps["fp8"] is not None
    assert gaps["nvfp4"] > gaps["fp8"] > 0
    same = _drift(policy, policy, prompts, noise_level=0.7)
    assert same.mean_abs_logprob_gap == 0.0


def test_spearman_with_ties_and_constants() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # Ranks [0, 1.5, 1.5, 3] against [0, 1, 2, 3]: 4.5 / sqrt(4.5 * 5).
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), a) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman(torch.ones(4), a))
    with pytest.raises(ValueError, match="1-D"):
        spearman(a, a[:3])
