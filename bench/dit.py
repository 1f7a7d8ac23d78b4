"""SanaDiT against diffusers' SanaTransformer2DModel with identical weights: forward latency and a full
denoising loop (our `sample` against the same Euler + CFG loop driving the diffusers model).

    sana-rl bench dit --quick    # CPU: tiny preset, and the 0.6B shape at 8x8 latents (< 60 s)
    sana-rl bench dit            # CPU: 16x16 latents; GPU: tiny, 0.6B and 1.6B at 1024 px in bf16

Both models are timed interleaved in one process (bench.harness). Before timing, each case checks that
the two models agree (max abs difference of one forward and of the sampled latents, in `extra`). On a
GPU we also time our model under torch.compile (diffusers stays eager, as SanaPipeline runs it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.harness import Row, Timing, measure_pair, speed_row
from policy.flow import SamplerConfig, sample, seeded_noise, shifted_sigmas
from policy.sana import SanaConfig, SanaDiT
from policy.state_dict_adapter import config_to_diffusers, import_state_dict

SUITE = "dit"
BASELINE = "diffusers SanaTransformer2DModel"
GUIDANCE = 4.5  # Sana's default CFG scale: the loop runs cond + uncond as one batch


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    cfg: SanaConfig
    side: int
    """Latent side (tokens = (side / patch)^2)."""
    batch: int
    steps: int
    text_len: int
    note: str = ""


def _cases(device: torch.device, quick: bool) -> list[Case]:
    tiny = SanaConfig.preset("tiny")
    if device.type == "cuda":
        return [
            Case("tiny 32px", tiny, 32, 8, 20, 32),
            Case("0.6B 1024px", SanaConfig.preset("0.6B"), 32, 4, 20, 300),
            Case("1.6B 1024px", SanaConfig.preset("1.6B"), 32, 4, 20, 300),
        ]
    side = 8 if quick else 16
    note = f"CPU: {side}x{side} latents ({side * side} tokens), not 32x32 (1024 px)"
    return [
        Case("tiny 32px", tiny, 32, 4, 4 if quick else 10, 32),
        Case(
            f"0.6B {side}x{side} latents",
            SanaConfig.preset("0.6B"),
            side,
            1 if quick else 2,
            2 if quick else 4,
            64,
            note,
        ),
    ]


def _models(cfg: SanaConfig, device: torch.device, dtype: torch.dtype) -> tuple[SanaDiT, Any]:
    """A randomly initialised diffusers model and our model holding the same weights."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device(device):  # diffusers' default init: no zero layers, so outputs are not trivial
        theirs: Any = SanaTransformer2DModel(**kwargs)
    if dtype != torch.float32:
        theirs = theirs.to(dtype)
    with torch.device("meta"):
        ours = SanaDiT(cfg)
    ours.load_state_dict(import_state_dict(theirs.state_dict(), cfg, "diffusers"), assign=True)
    return ours.eval(), theirs.eval()


def _sync(device: torch.device, fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call


def _diffusers_loop(
    model: Any, noise: torch.Tensor, text2: torch.Tensor, mask2: torch.Tensor, steps: int, shift: float
) -> torch.Tensor:
    """SanaPipeline's denoising loop reduced to its essentials: CFG in one batch, flow-Euler steps."""
    sigmas = shifted_sigmas(steps, shift).tolist()
    x, dtype = noise, model.dtype  # diffusers casts nothing: inputs must come in the weights' dtype
    text2 = text2.to(dtype)
    for i in range(steps):
        t = torch.full((2 * len(x),), sigmas[i] * 1000.0, device=x.device)
        v = model(torch.cat([x, x]).to(dtype), encoder_hidden_states=text2, timestep=t, encoder_attention_mask=mask2,
                  return_dict=False)[0].float()  # fmt: skip
        v_cond, v_uncond = v.chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + GUIDANCE * (v_cond - v_uncond))
    return x


def _case_rows(case: Case, device: torch.device, quick: bool) -> list[Row]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    target = 1.3 if gpu else 1.0
    # The agreement checks below run each function once first, so CPU needs no further warm-up; GPU
    # warms up torch.compile and the allocator.
    warmup, repeats = (2 if gpu else 0), (3 if quick else 7)
    cfg, b = case.cfg, case.batch
    ours, theirs = _models(cfg, device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, cfg.in_channels, case.side, case.side, generator=g).to(device, dtype)
    t = torch.linspace(950.0, 50.0, b).to(device)
    text = torch.randn(b, case.text_len, cfg.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(b, case.text_len, dtype=torch.bool, device=device)
    mask[:, case.text_len * 3 // 4 :] = False  # padded prompts, as real batches have
    with torch.no_grad():
        fwd_diff = (
            (ours(x, t, text, mask) - theirs(x, text, t, encoder_attention_mask=mask, return_dict=False)[0])
            .abs()
            .max()
        )
    variants: list[tuple[str, Callable[..., torch.Tensor]]] = [("", ours)]
    if gpu:
        variants.append((" (ours compiled)", torch.compile(ours)))
    rows = []
    for label, model in variants:
        t_ours, t_base = measure_pair(
            _sync(device, lambda m=model: m(x, t, text, mask)),  # type: ignore[misc]
            _sync(device, lambda: theirs(x, text, t, encoder_attention_mask=mask, return_dict=False)),
            warmup=warmup,
            repeats=repeats,
        )
        row = speed_row(
            SUITE, f"{case.name} forward B={b}{label}", t_ours, t_base, baseline_name=BASELINE, target=target
        )
        row.note, row.extra = case.note, {"max_abs_diff": float(fwd_diff)}
        rows.append(row)

    # The denoising loop: b images, CFG with an empty-prompt embedding, `steps` Euler steps.
    seeds = list(range(b))
    sampler = SamplerConfig(steps=case.steps, shift=3.0, guidance_scale=GUIDANCE)
    uncond, umask = torch.zeros(1, case.text_len, cfg.caption_channels, device=device), mask[:1].clone()
    text2, mask2 = torch.cat([text, uncond.expand(b, -1, -1)]), torch.cat([mask, umask.expand(b, -1)])
    noise = seeded_noise(seeds, (cfg.in_channels, case.side, case.side)).to(device)
    model = variants[-1][1]

    def run_ours() -> torch.Tensor:
        out = sample(model, seeds=seeds, text=text, text_mask=mask, cfg=sampler,
                     latent_shape=(cfg.in_channels, case.side, case.side), uncond_text=uncond, uncond_mask=umask)  # fmt: skip
        return out.x0

    def run_theirs() -> torch.Tensor:
        return _diffusers_loop(theirs, noise, text2, mask2, case.steps, 3.0)

    with torch.no_grad():
        loop_diff = (run_ours() - run_theirs()).abs().max()
    t_ours, t_base = measure_pair(
        _sync(device, run_ours), _sync(device, run_theirs), warmup=warmup, repeats=repeats
    )
    rows.append(_images_row(case, t_ours, t_base, target, variants[-1][0], float(loop_diff)))
    return rows


def _images_row(case: Case, ours: Timing, base: Timing, target: float, label: str, diff: float) -> Row:
    ratio = base.median_s / ours.median_s
    return Row(
        suite=SUITE,
        case=f"{case.name} sample {case.steps} steps CFG x{case.batch}{label}",
        metric="images/s",
        value=case.batch / ours.median_s,
        baseline_name=f"Euler loop on {BASELINE}",
        baseline=case.batch / base.median_s,
        ratio=ratio,
        target=f">= {target}x",
        met=ratio >= target,
        spread=case.batch * ours.iqr_s / ours.median_s**2,  # first-order IQR of images/s
        note=case.note,
        extra={"max_abs_diff_x0": diff},
    )


def run(quick: bool) -> list[Row]:
    """Rows for every case on this machine's device (CUDA when available)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[Row] = []
    for case in _cases(device, quick):
        rows += _case_rows(case, device, quick)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(dataclasses.asdict(r))
