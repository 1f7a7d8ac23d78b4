"""learner.autocast: the policy's products in bfloat16 under torch.autocast on a CPU, cross-attention's
softmax kept in float32, float32 weights and losses that track a float32 learner's."""

from __future__ import annotations

import math
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
    with pytest.raises(ConfigError, match=r"learner\.autocast: expected one of 'none' \| 'bfloat16'"):
        load_recipe(RECIPES / "tiny.yaml", ["learner.autocast=bf16"])
