"""The learner and the rollout engine on a real GPU, without Ray: the code paths a GPU run takes.

A learner rank on `cuda:0` joins a one-rank NCCL group, shards the tiny DiT with FSDP2 in BF16 mixed
precision, takes NFT and GRPO steps and gathers its weights for rollout; a rollout engine on the GPU loads
that snapshot, keeps its full-precision copy in BF16 and generates with each low-precision copy. Records
leave both on the CPU, as Ray would carry them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from actors.records import TrainBatch
from kernels.quantize import QuantConfig
from policy.codecs import CodecConfig
from policy.flow import SamplerConfig
from policy.losses import LossConfig
from policy.parallelize import OptimConfig
from policy.sana import ModelConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODEL = ModelConfig(preset="tiny", overrides={"depth": 2, "patch_size": 2})
WIDTH = 384  # the tiny preset's caption channels


class HashEncoder:
    """A frozen stand-in text encoder (the MiniLM package is not on GPU machines): seeded by the prompt."""

    width = WIDTH

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embs = [
            torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(len(p) * 7919)) for p in prompts
        ]
        return torch.stack(embs), torch.ones(len(prompts), 6, dtype=torch.bool)


def _batch(kind: str, seed: int, b: int = 4) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(
        kind=kind,  # type: ignore[arg-type]
        policy_version=0,
        x0=torch.randn(b, 3, 16, 16, generator=g),
        text=torch.randn(b, 6, WIDTH, generator=g),
        text_mask=torch.ones(b, 6, dtype=torch.bool),
        advantages=torch.randn(b, generator=g),
        seed=seed,
    )


@pytest.fixture(scope="module")
def learner() -> Iterator[object]:
    import torch.distributed as dist

    from actors.learner import Learner, LearnerConfig

    rank = Learner(rank=0, world_size=1)
    rank.init_distributed(*rank.open_rendezvous(), timeout_s=120)
    cfg = LearnerConfig(param_dtype="bfloat16", micro_batch_size=2, optim=OptimConfig(lr=1e-3))
    rank.setup(MODEL, cfg, LossConfig(), seed=0)
    yield rank
    dist.destroy_process_group()


def test_learner_trains_in_bf16_on_the_gpu(learner: object) -> None:
    from actors.learner import Learner

    assert isinstance(learner, Learner)
    assert learner.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in learner.params)
    before = learner.state_for_rollout()
    assert before is not None
    for step, kind in enumerate(("nft", "fm")):
        metrics = learner.forward_backward(_batch(kind, seed=step))
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        version, step_metrics = learner.optim_step()
        assert version == step + 1 and step_metrics["skipped"] == 0.0
    snapshot = learner.state_for_rollout()
    assert snapshot is not None and snapshot.policy_version == 2
    assert all(t.device.type == "cpu" for t in snapshot.state.values())
    moved = [k for k in before.state if not torch.equal(before.state[k], snapshot.state[k])]
    assert moved, "no weight changed after two optimizer steps"


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "w4a16"])
def test_engine_generates_on_the_gpu_from_the_learner_snapshot(
    learner: object, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from actors import generator
    from actors.learner import Learner
    from kernels import dispatch

    assert isinstance(learner, Learner)
    monkeypatch.setattr(generator, "build_text_encoder", lambda cfg, device: HashEncoder())
    engine = generator.RolloutEngine(
        MODEL, CodecConfig(text_encoder="random", image_size=16), SamplerConfig(steps=4),
        QuantConfig(fmt=fmt, min_dim=0), ["bf16", fmt], device="cuda",
    )  # fmt: skip
    assert next(engine.policy.parameters()).dtype == torch.bfloat16
    snapshot = learner.state_for_rollout()
    assert snapshot is not None
    assert engine.load_weights(snapshot) == snapshot.policy_version
    prompts = ["one red circle", "two blue squares"]
    outs = {}
    for precision in ("bf16", fmt):
        req = generator.GenerateRequest(
            prompts=prompts, seeds=[0, 1], group_ids=[0, 1], steps=4, precision=precision,  # type: ignore[arg-type]
            expect_version=engine.version, return_trajectory=True, noise_level=0.7,
        )  # fmt: skip
        out = engine.generate(req)
        assert out.latents.device.type == "cpu" and out.latents.dtype == torch.float32
        assert out.log_probs is not None and out.log_probs.device.type == "cpu"
        assert out.images.shape == (2, 16, 16, 3) and torch.isfinite(out.latents).all()
        outs[precision] = out.latents
        rollouts = out
    # The quantized copy is the same policy at lower precision: close to BF16, not identical to it.
    rel = float((outs[fmt] - outs["bf16"]).norm() / outs["bf16"].norm())
    assert 0.0 < rel < 0.5, f"{fmt} vs bf16 relative difference {rel:.3f}"
    impl = dispatch.pick(fmt, torch.device("cuda")).impl  # type: ignore[arg-type]
    print(f"{fmt}: {impl}, relative difference to bf16 {rel:.4f}")
    # GRPO trains on the GPU rollout's own SDE trajectory and log-probs.
    batch = TrainBatch(
        kind="grpo", policy_version=rollouts.policy_version, x0=rollouts.latents, text=rollouts.text,
        text_mask=rollouts.text_mask, advantages=torch.tensor([1.0, -1.0]), trajectory=rollouts.trajectory,
        sigmas=rollouts.sigmas, log_probs=rollouts.log_probs, train_steps=torch.tensor([0, 2]), seed=5,
    )  # fmt: skip
    metrics = learner.forward_backward(batch)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    version, step_metrics = learner.optim_step()
    assert version == snapshot.policy_version + 1 and step_metrics["skipped"] == 0.0
