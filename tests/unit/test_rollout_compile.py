"""`rollout.compile`: the compiled rollout copies sample what the eager ones do, and see every weight sync
without recompiling (Inductor must read the parameters and quantized buffers as inputs, not constants).

On the CPU this compiles the tiny DiT with Inductor's C++ backend; on a GPU (marked `gpu`) with Triton.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.generator import GenerateRequest, RolloutEngine
from actors.records import WeightSnapshot
from kernels.quantize import Format, QuantConfig
from policy.codecs import CodecConfig
from policy.flow import SamplerConfig
from policy.sana import ModelConfig, build_policy

MODEL = ModelConfig(preset="tiny", overrides={"depth": 2, "patch_size": 2})
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CASES = [
    ("cpu", "nvfp4"),
    # On a GPU each format runs its own kernel under the compiler: FP8 `_scaled_mm`, the Triton W4A16 GEMM
    # (NVFP4 on sm_90 and W4A16), or FP4 `_scaled_mm` on Blackwell.
    *(pytest.param("cuda", fmt, marks=_GPU) for fmt in ("fp8", "nvfp4", "w4a16")),
]


def _snapshot(version: int) -> WeightSnapshot:
    torch.manual_seed(version)
    policy = build_policy(MODEL)
    with torch.no_grad():
        for p in policy.parameters():  # out of the zero-initialised heads, so samples depend on weights
            p.add_(torch.randn_like(p) * 0.05)
    return WeightSnapshot(policy_version=version, state=policy.state_dict())


class _PromptSeededEncoder:
    """A frozen stand-in text encoder (GPU machines lack the MiniLM package): seeded by the prompt."""

    width = 384  # the tiny preset's caption channels

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embs = [
            torch.randn(6, self.width, generator=torch.Generator().manual_seed(len(p) + 1)) for p in prompts
        ]
        return torch.stack(embs), torch.ones(len(prompts), 6, dtype=torch.bool)


@pytest.fixture(autouse=True)
def _no_minilm(monkeypatch: pytest.MonkeyPatch) -> None:
    from actors import generator

    monkeypatch.setattr(generator, "build_text_encoder", lambda cfg, device: _PromptSeededEncoder())


def _engine(fmt: Format, device: str, compile: bool) -> RolloutEngine:
    return RolloutEngine(
        MODEL, CodecConfig(text_encoder="random", image_size=16), SamplerConfig(steps=3, guidance_scale=2.0),
        QuantConfig(fmt=fmt, min_dim=0), ["bf16", fmt], device=device, compile=compile,
    )  # fmt: skip


def _latents(engine: RolloutEngine, precision: str, n: int = 2) -> torch.Tensor:
    req = GenerateRequest(
        prompts=["a red circle", "two blue squares", "a green triangle"][:n], seeds=[3, 4, 5][:n],
        group_ids=[0, 1, 2][:n], steps=3, precision=precision,  # type: ignore[arg-type]
        expect_version=engine.version,
    )  # fmt: skip
    return engine.generate(req).latents


def test_engine_encodes_each_distinct_prompt_once_and_keeps_the_order() -> None:
    engine = _engine("nvfp4", "cpu", compile=False)
    asked: list[list[str]] = []
    inner = engine.text_encoder.encode

    def spy(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(list(prompts))
        return inner(prompts)

    engine.text_encoder.encode = spy  # type: ignore[method-assign]
    prompts = ["a red circle", "two blue squares", "a red circle", "a red circle", "two blue squares"]
    emb, mask = engine.encode(prompts)
    assert asked == [["a red circle", "two blue squares"]]
    want, want_mask = _PromptSeededEncoder().encode(prompts)
    assert torch.equal(emb, want) and torch.equal(mask, want_mask)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("device", "fmt"), CASES)
def test_compiled_rollouts_match_eager_and_follow_every_sync(
    device: str, fmt: Format, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.utils import counters

    # A compile killed mid-way leaves a zero-byte .so in Inductor's shared /tmp cache that fails every later
    # load ("file too short"); a cache of the test's own keeps one interrupted run from failing the next.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    # Fused kernels round differently: BF16 on the GPU, and a flipped 4- or 8-bit activation rounding.
    tols = {"bf16": 2e-2 if device == "cuda" else 1e-4, fmt: 2e-2}
    eager, compiled = _engine(fmt, device, compile=False), _engine(fmt, device, compile=True)
    torch._dynamo.reset()
    first: dict[str, torch.Tensor] = {}
    for version in (1, 2):
        snap = _snapshot(version)
        for engine in (eager, compiled):
            assert engine.load_weights(snap) == version
        if version == 2:
            graphs = counters["stats"]["unique_graphs"]
        for precision in ("bf16", fmt):
            # after the sync, another batch size too: preview, final and evaluation batches differ
            n = 2 if version == 1 else 3
            want, got = _latents(eager, precision, n), _latents(compiled, precision, n)
            assert _rel(got, want) < tols[precision], (
                f"{precision} v{version}: compiled vs eager {_rel(got, want):.2e}"
            )
            if version == 1:
                first[precision] = got
            else:  # the compiled copy really sampled with the synced weights
                assert _rel(got[:2], first[precision]) > 0.1
    assert counters["stats"]["unique_graphs"] == graphs, (
        "a weight sync or another batch size recompiled the rollout copy"
    )
    assert set(compiled._compiled) == {"bf16", fmt} and not eager._compiled
