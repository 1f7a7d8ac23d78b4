"""learner.autocast and rollout.autocast: the policy's products in bfloat16 under torch.autocast on a CPU,
cross-attention's softmax kept in float32, float32 weights and losses that track a float32 learner's,
rollouts whose sampler state stays float32 and evaluations that ignore it; `auto` follows the CPU's bf16
instructions."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from actors.records import TrainBatch
from orchestrator.config import load_recipe
from orchestrator.schema import ConfigError
from policy.sana import ModelConfig, build_policy

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _inputs(b: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, 16, 16, generator=g)
    text = torch.randn(b, 6, 384, generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[0, 4:] = False  # a padded caption: the attention mask takes part
    return x, torch.full((b,), 500.0), text, mask


def test_cpu_autocast_runs_products_in_bf16_and_attention_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_policy(ModelConfig(preset="tiny", overrides={"depth": 2}))
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append(q.dtype)
        return sdpa(q, k, v, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    linear_out: list[torch.dtype] = []
    model.blocks[0].cross_attn.q_linear.register_forward_hook(lambda m, i, o: linear_out.append(o.dtype))
    args = _inputs()
    with torch.no_grad():
        ref = model(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(*args)
    assert linear_out == [torch.float32, torch.bfloat16]
    assert seen == [torch.float32] * 4  # two blocks, without and with autocast
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.05)


def test_autocast_learner_tracks_the_float32_learner() -> None:
    import torch.distributed as dist

    from actors.learner import Learner, LearnerConfig
    from policy.losses import LossConfig
    from policy.parallelize import OptimConfig

    learners: dict[str, Learner] = {}
    try:
        for mode in ("none", "bfloat16"):
            learner = Learner(rank=0, world_size=1, num_threads=1)
            if not dist.is_initialized():
                learner.init_distributed(*learner.open_rendezvous(), timeout_s=60)
            cfg = LearnerConfig(param_dtype="float32", micro_batch_size=4, optim=OptimConfig(lr=1e-3))
            cfg.autocast = mode  # type: ignore[assignment]
            learner.setup(ModelConfig(preset="tiny", overrides={"depth": 2}), cfg, LossConfig(), seed=0)
            learners[mode] = learner
        start = [p.detach().clone() for p in learners["bfloat16"].params]
        products: list[torch.dtype] = []
        learners["bfloat16"].model.blocks[1].attn.qkv.register_forward_hook(
            lambda m, i, o: products.append(o.dtype)
        )
        losses: dict[str, list[float]] = {m: [] for m in learners}
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            batch = TrainBatch(
                kind="fm", policy_version=-1, x0=torch.randn(8, 3, 16, 16, generator=g),
                text=torch.randn(8, 6, 384, generator=g), text_mask=torch.ones(8, 6, dtype=torch.bool), seed=step,
            )  # fmt: skip
            for mode, learner in learners.items():
                losses[mode].append(learner.forward_backward(batch)["loss"])
                assert learner.optim_step()[1]["skipped"] == 0.0
        assert products and set(products) == {torch.bfloat16}
        assert all(math.isfinite(v) for v in losses["bfloat16"])
        assert losses["bfloat16"] == pytest.approx(losses["none"], abs=0.02)
        params = learners["bfloat16"].params
        assert all(p.dtype == torch.float32 for p in params)  # the weights Adam updates stay float32
        assert any(not torch.equal(p.detach(), s) for p, s in zip(params, start, strict=True))
    finally:
        dist.destroy_process_group()


def test_recipe_names_the_field_for_an_unknown_autocast_dtype() -> None:
    assert load_recipe(RECIPES / "tiny.yaml", ["learner.autocast=bfloat16"]).learner.autocast == "bfloat16"
    with pytest.raises(
        ConfigError, match=r"learner\.autocast: expected one of 'none' \| 'bfloat16' \| 'auto'"
    ):
        load_recipe(RECIPES / "tiny.yaml", ["learner.autocast=bf16"])
    cfg = load_recipe(RECIPES / "tiny.yaml", ["rollout.autocast=auto", "learner.autocast=auto"])
    assert (cfg.rollout.autocast, cfg.learner.autocast) == ("auto", "auto")
    with pytest.raises(ConfigError, match=r"rollout\.autocast: expected one of"):
        load_recipe(RECIPES / "tiny.yaml", ["rollout.autocast=fp16"])


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpus_bf16_instructions(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    from policy import autocast

    monkeypatch.setattr(autocast, "cpu_has_native_bf16", lambda: native)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast.resolve("auto", cpu) is native
    assert autocast.resolve("auto", gpu) is False  # GPUs take their precision from the parameters
    assert autocast.resolve("bfloat16", cpu) and autocast.resolve("bfloat16", gpu)
    assert not autocast.resolve("none", cpu)
    with autocast.autocast_context("auto", cpu):
        assert torch.is_autocast_enabled("cpu") is native
    with pytest.raises(ValueError, match="autocast: 'fp16' is not one of"):
        autocast.resolve("fp16", cpu)  # type: ignore[arg-type]


def test_native_bf16_probe_reads_torchs_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from policy import autocast

    for avx512_bf16, amx, expected in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        autocast.cpu_has_native_bf16.cache_clear()
        assert autocast.cpu_has_native_bf16() is expected
    autocast.cpu_has_native_bf16.cache_clear()


def test_bf16_rollouts_keep_float32_records_and_track_float32_ones() -> None:
    from actors.generator import GenerateRequest, RolloutEngine
    from actors.records import WeightSnapshot
    from kernels.quantize import QuantConfig
    from policy.codecs import CodecConfig
    from policy.flow import SamplerConfig

    model_cfg = ModelConfig(preset="tiny", overrides={"depth": 2, "patch_size": 2})
    torch.manual_seed(0)
    policy = build_policy(model_cfg)
    with torch.no_grad():
        for p in policy.parameters():  # out of the zero-initialised heads, so samples depend on the weights
            p.add_(torch.randn_like(p) * 0.05)
    latents: dict[str, torch.Tensor] = {}
    for mode in ("none", "bfloat16"):
        engine = RolloutEngine(
            model_cfg, CodecConfig(text_encoder="random", image_size=16), SamplerConfig(steps=4),
            QuantConfig(fmt="nvfp4", min_dim=0), ["bf16", "nvfp4"], autocast=mode,  # type: ignore[arg-type]
        )  # fmt: skip
        engine.load_weights(WeightSnapshot(policy_version=3, state=policy.state_dict()))
        products: list[torch.dtype] = []
        engine.policy.blocks[0].attn.qkv.register_forward_hook(
            lambda m, i, o, seen=products: seen.append(o.dtype)
        )
        req = GenerateRequest(
            prompts=["a red circle", "two blue squares"], seeds=[3, 4], group_ids=[0, 1], steps=4,
            precision="bf16", expect_version=3, return_trajectory=True,
        )  # fmt: skip
        out = engine.generate(req)
        assert set(products) == {torch.bfloat16 if mode == "bfloat16" else torch.float32}
        assert out.log_probs is not None and out.trajectory is not None
        # the sampler's state and the records stay float32
        assert out.latents.dtype == out.log_probs.dtype == out.trajectory.dtype == torch.float32
        assert torch.isfinite(out.latents).all() and out.policy_version == 3
        latents[mode] = out.latents
        preview = engine.generate(replace(req, precision="nvfp4"))  # the emulated NVFP4 copy under autocast
        assert torch.isfinite(preview.latents).all()
        products.clear()  # evaluations sample without rollout.autocast, so every CPU measures alike
        latents[f"{mode} eval"] = engine.generate(replace(req, evaluation=True)).latents
        assert set(products) == {torch.float32}
    assert torch.equal(latents["bfloat16 eval"], latents["none eval"])
    assert torch.equal(latents["none eval"], latents["none"])
    assert not torch.equal(latents["bfloat16"], latents["none"])
    torch.testing.assert_close(latents["bfloat16"], latents["none"], rtol=0.05, atol=0.05)
