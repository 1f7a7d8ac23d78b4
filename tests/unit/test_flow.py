"""Flow matching: sigma schedule, ODE/SDE steps against their closed forms, seeded sampling, CFG, training."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from policy.flow import (
    SamplerConfig,
    drop_captions,
    ode_step,
    sample,
    sde_log_prob,
    sde_step,
    seeded_noise,
    shifted_sigmas,
)
from policy.sana import SanaConfig, SanaDiT

TINY = SanaConfig(in_channels=3, out_channels=3, hidden_size=64, depth=2, cross_heads=2, caption_channels=16,
                  patch_size=2)  # fmt: skip
LATENT = (3, 8, 8)


def _tiny_model() -> SanaDiT:
    torch.manual_seed(0)
    model = SanaDiT(TINY).eval()
    with torch.no_grad():  # the zero-initialised output layer would make every velocity 0
        model.final_layer.linear.weight.normal_(std=0.1)
    return model


def _text(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 6, dtype=torch.bool)
    mask[:, 4:] = False
    return torch.randn(n, 6, 16, generator=g), mask


def test_shifted_sigmas_run_from_one_to_zero_with_the_shift_formula() -> None:
    sigmas = shifted_sigmas(4, 3.0)
    assert sigmas.shape == (5,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[2].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert torch.allclose(shifted_sigmas(4, 1.0), torch.linspace(1, 0, 5))
    with pytest.raises(ValueError, match="steps"):
        shifted_sigmas(0, 3.0)


def _closed_form(x, v, sigma, sigma_next, a, sigma_1):  # type: ignore[no-untyped-def]
    """DESIGN.md section 3 written out literally, in float64."""
    dt = sigma_next - sigma
    std_i = a * math.sqrt(sigma / (1 - (sigma_1 if sigma == 1 else sigma)))
    mean = x * (1 + std_i**2 / (2 * sigma) * dt) + v * (1 + std_i**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_i * math.sqrt(-dt)


@pytest.mark.parametrize("step", [0, 2])  # step 0 has sigma = 1, where sigma_1 stands in
def test_sde_step_log_prob_is_the_closed_form_gaussian_density(step: int) -> None:
    torch.manual_seed(0)
    sigmas = shifted_sigmas(6, 3.0).double()
    s, s_next = sigmas[step].item(), sigmas[step + 1].item()
    x, v, noise = (torch.randn(3, *LATENT, dtype=torch.float64) for _ in range(3))
    x_next, log_prob, mean, std = sde_step(x, v, s, s_next, 0.7, noise)
    want_mean, want_std = _closed_form(x, v, s, s_next, 0.7, sigmas[1].item())
    assert torch.allclose(mean.double(), want_mean, atol=1e-5)
    assert float(std) == pytest.approx(want_std, rel=1e-5)
    assert torch.allclose(x_next.double(), want_mean + want_std * noise, atol=1e-5)
    density = torch.distributions.Normal(want_mean, want_std).log_prob(x_next.double()).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob.double(), density, atol=1e-4)


def test_sde_log_prob_rescores_per_sample_steps_and_is_differentiable() -> None:
    torch.manual_seed(0)
    sigmas = shifted_sigmas(5, 3.0)
    steps = [0, 3, 1]
    x, v, noise = torch.randn(3, *LATENT), torch.randn(3, *LATENT), torch.randn(3, *LATENT)
    x_next, old = [], []
    for b, i in enumerate(steps):
        xn, lp, _, _ = sde_step(
            x[b : b + 1], v[b : b + 1], sigmas[i].item(), sigmas[i + 1].item(), 0.5, noise[b : b + 1]
        )
        x_next.append(xn)
        old.append(lp)
    v_new = v.clone().requires_grad_(True)
    idx = torch.tensor(steps)
    log_prob, _, _ = sde_log_prob(torch.cat(x_next), x, v_new, sigmas[idx], sigmas[idx + 1], 0.5)
    assert torch.allclose(log_prob, torch.cat(old), atol=1e-5)
    log_prob.sum().backward()
    assert v_new.grad is not None and v_new.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sigma"):
        sde_log_prob(x, x, v, sigmas[:2], sigmas[1:3], 0.5)


def test_sde_with_zero_noise_level_is_the_euler_ode_step() -> None:
    torch.manual_seed(0)
    x, v, noise = torch.randn(2, *LATENT), torch.randn(2, *LATENT), torch.randn(2, *LATENT)
    x_sde, log_prob, _, _ = sde_step(x, v, 0.6, 0.45, 0.0, noise)
    assert torch.allclose(x_sde, ode_step(x, v, 0.6, 0.45), atol=1e-6)
    assert torch.allclose(x_sde, x - 0.15 * v, atol=1e-6)
    assert torch.equal(log_prob, torch.zeros(2))


def test_ode_sampling_is_the_euler_loop() -> None:
    model = _tiny_model()
    text, mask = _text(2)
    cfg = SamplerConfig(steps=4, shift=3.0)
    out = sample(
        model, seeds=[5, 6], text=text, text_mask=mask, cfg=cfg, latent_shape=LATENT, return_trajectory=True
    )
    x, sigmas = seeded_noise([5, 6], LATENT), shifted_sigmas(4, 3.0)
    with torch.no_grad():
        for i in range(4):
            x = x + (sigmas[i + 1] - sigmas[i]) * model(
                x, torch.full((2,), sigmas[i].item() * 1000), text, mask
            )
    assert torch.allclose(out.x0, x, atol=1e-6)
    assert out.trajectory is not None and out.trajectory.shape == (2, 5, *LATENT)
    assert torch.equal(out.trajectory[:, -1], out.x0) and torch.equal(
        out.trajectory[:, 0], seeded_noise([5, 6], LATENT)
    )
    assert out.log_probs is not None and torch.equal(out.log_probs, torch.zeros(2, 4))
    assert not out.sde_mask.any()


def test_sampling_builds_no_autograd_graph() -> None:
    """Rollouts of a trainable policy must not keep every step's activations alive for a backward."""
    model = _tiny_model()
    assert all(p.requires_grad for p in model.parameters())
    text, mask = _text(2)
    cfg = SamplerConfig(steps=2, noise_level=0.7)
    out = sample(
        model, seeds=[0, 1], text=text, text_mask=mask, cfg=cfg, latent_shape=LATENT, return_trajectory=True
    )
    assert out.log_probs is not None
    assert not out.x0.requires_grad and not out.log_probs.requires_grad


def test_a_seed_gives_the_same_sample_alone_or_in_a_batch() -> None:
    model = _tiny_model()
    seeds = [3, 17, 11, 5, 2]
    text, mask = _text(5)
    uncond, umask = torch.zeros(1, 2, 16), torch.ones(1, 2, dtype=torch.bool)
    cfg = SamplerConfig(steps=4, noise_level=0.7, sde_window=(1, 3), guidance_scale=4.0)
    kw = {
        "cfg": cfg,
        "latent_shape": LATENT,
        "uncond_text": uncond,
        "uncond_mask": umask,
        "return_trajectory": True,
    }
    batch = sample(model, seeds=seeds, text=text, text_mask=mask, **kw)  # type: ignore[arg-type]
    alone = sample(model, seeds=[17], text=text[1:2], text_mask=mask[1:2], **kw)  # type: ignore[arg-type]
    assert batch.trajectory is not None and alone.trajectory is not None
    # Not bit-identical on CPU: MKL picks different GEMM kernels for 1 and 5 rows (last-ulp differences,
    # here amplified by guidance 4). The bound is 1e-6 relative to the latents' magnitude.
    scale = alone.trajectory.abs().max()
    assert (batch.trajectory[1] - alone.trajectory[0]).abs().max() <= 1e-6 * scale
    assert batch.log_probs is not None and alone.log_probs is not None
    assert (batch.log_probs[1] - alone.log_probs[0]).abs().max() <= 1e-6 * alone.log_probs.abs().max()
    assert batch.sde_mask.tolist() == [False, True, True, False]
    assert (batch.log_probs[:, [0, 3]] == 0).all() and (batch.log_probs[:, [1, 2]] != 0).all()
    # The SDE noise depends on the seed too: two seeds never share a trajectory.
    assert not torch.allclose(batch.x0[0], batch.x0[1])


def test_classifier_free_guidance_mixes_velocities() -> None:
    def model(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # A constant velocity per row: its text's first feature, so cond and uncond differ.
        return text[:, 0, 0].view(-1, 1, 1, 1).expand_as(x).clone()

    text, mask = _text(2)
    uncond = torch.full((1, 3, 16), 0.25)
    cfg = SamplerConfig(steps=3, guidance_scale=5.0)
    out = sample(model, seeds=[1, 2], text=text, text_mask=mask, cfg=cfg, latent_shape=LATENT,
                 uncond_text=uncond, uncond_mask=torch.ones(1, 3, dtype=torch.bool))  # fmt: skip
    v = 0.25 + 5.0 * (text[:, 0, 0] - 0.25)
    assert torch.allclose(
        out.x0, seeded_noise([1, 2], LATENT) - v.view(-1, 1, 1, 1), atol=1e-5
    )  # sum of dt = -1
    with pytest.raises(ValueError, match="uncond_text"):
        sample(model, seeds=[1, 2], text=text, text_mask=mask, cfg=cfg, latent_shape=LATENT)


def test_bad_sampler_inputs_are_refused() -> None:
    text, mask = _text(2)
    with pytest.raises(ValueError, match="sde_window"):
        sample(_tiny_model(), seeds=[1, 2], text=text, text_mask=mask, latent_shape=LATENT,
               cfg=SamplerConfig(steps=4, noise_level=0.5, sde_window=(2, 9)))  # fmt: skip
    with pytest.raises(ValueError, match="text"):
        sample(_tiny_model(), seeds=[1], text=text, text_mask=mask, latent_shape=LATENT, cfg=SamplerConfig())


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Tiny ops gain nothing from threads, and spinning OpenMP threads crawl when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_tiny_model_overfits_a_few_pairs_with_the_flow_matching_loss() -> None:
    torch.manual_seed(0)
    model = SanaDiT(TINY)
    # Four (latent, caption) pairs, each seen at two fixed (sigma, noise) draws.
    x0, text = torch.randn(4, *LATENT).repeat(2, 1, 1, 1), torch.randn(4, 6, 16).repeat(2, 1, 1)
    mask = torch.ones(8, 6, dtype=torch.bool)
    eps, sigma = torch.randn(x0.shape), torch.rand(8) * 0.8 + 0.1
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(50):
        loss = ((model(x_sigma, sigma * 1000, text, mask) - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] * 10 <= losses[0], losses[::10]


def test_caption_dropout_is_seeded_and_keeps_the_rest() -> None:
    captions = [f"caption {i}" for i in range(2000)]
    dropped = drop_captions(captions, 0.1, seed=7)
    assert dropped == drop_captions(captions, 0.1, seed=7)  # a redone step drops the same captions
    assert dropped != drop_captions(captions, 0.1, seed=8)
    empty = [i for i, c in enumerate(dropped) if c == ""]
    assert 150 < len(empty) < 250  # Binomial(2000, 0.1): mean 200, sd 13
    assert all(c == captions[i] for i, c in enumerate(dropped) if c)
    assert drop_captions(captions, 0.0, seed=7) == captions
    assert set(drop_captions(captions, 1.0, seed=7)) == {""}
    with pytest.raises(ValueError, match="caption_dropout"):
        drop_captions(captions, 1.5, seed=7)
