"""Low-precision rollout copies against BF16, per format: GEMMs, DiT forward, rollout, bytes, re-quantization;
on a CPU also the bf16-autocast rollout (`rollout.autocast`) against float32 products.

    sana-rl bench lowprec --quick     # CPU: emulated formats, small token counts, tiny DiT (< 60 s)
    sana-rl bench lowprec             # GPU: Sana layer shapes at 1024 tokens, the 1.6B DiT

Every ratio compares with a baseline timed in the same process, interleaved (bench.harness). On a GPU the
baseline runs in bf16; on CPU it is the "bf16" rollout copy, which holds BF16-rounded weights in float32
(kernels/quantize.py) because that is what a CPU rollout runs. CPU formats are emulated (dequantize +
fp32 matmul), so on CPU the honest result is memory, not speed. The speed targets (FP8 >= 1.5x BF16
rollout images/s on Hopper, NVFP4 >= 2x on Blackwell) are judged only on those GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from bench.harness import Row, Timing, measure_pair, speed_row
from kernels import dispatch
from kernels.quantize import Format, QuantConfig, QuantLinear, quantize_policy, requantize_
from policy.flow import SamplerConfig, sample
from policy.sana import SanaConfig, SanaDiT

SUITE = "lowprec"
FORMATS: tuple[Format, ...] = ("fp8", "nvfp4", "w4a16")
SANA_GEMMS = ((2240, 11200), (5600, 2240), (2240, 4480))
"""(in, out) of Sana 1.6B Linears: Mix-FFN inverted_conv and point_conv, cross-attention kv_linear."""
ROLLOUT_TARGETS: dict[str, tuple[float, tuple[int, int]]] = {"fp8": (1.5, (8, 9)), "nvfp4": (2.0, (10, 0))}
"""Rollout images/s over BF16, and the least compute capability on which the target is judged."""


def timed(device: torch.device, fn: Callable[..., object], *args: object) -> Callable[[], None]:
    """A zero-argument call of fn(*args) that waits for the GPU, for bench.harness to time."""

    def call() -> None:
        with torch.no_grad():
            fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call


def _pair(quick: bool, ours: Callable[[], None], base: Callable[[], None]) -> tuple[Timing, Timing]:
    if quick:
        return measure_pair(ours, base, warmup=1, repeats=2)
    return measure_pair(ours, base, warmup=2, repeats=8)


def _gemm_rows(device: torch.device, quick: bool) -> list[Row]:
    gpu = device.type == "cuda"
    tokens = 1024 if gpu else (64 if quick else 256)
    dtype = torch.bfloat16 if gpu else torch.float32
    note = "" if tokens == 1024 else f"CPU: {tokens} tokens, not 1024"
    rows = []
    for fin, fout in SANA_GEMMS:
        torch.manual_seed(0)
        dense = nn.Linear(fin, fout, device=device, dtype=dtype)
        x = torch.randn(tokens, fin, device=device, dtype=dtype)
        for fmt in FORMATS:
            q = QuantLinear.from_linear(dense, fmt)
            t_q, t_b = _pair(quick, timed(device, q, x), timed(device, dense, x))
            row = speed_row(
                SUITE, f"gemm {fin}x{fout} {fmt}", t_q, t_b, baseline_name=f"{dtype} linear", target=None
            )
            row.note = "; ".join(filter(None, [str(dispatch.pick(fmt, device)), note]))
            rows.append(row)
    return rows


def _rollout_row(
    fmt: str, device: torch.device, images: int, t_q: Timing, t_b: Timing, where: str, compiled: bool = False
) -> Row:
    ratio = t_b.median_s / t_q.median_s
    target, capability = ROLLOUT_TARGETS.get(fmt, (0.0, (99, 0)))
    judged = bool(target) and device.type == "cuda" and torch.cuda.get_device_capability(device) >= capability
    note = (
        where
        if judged or not target
        else f"{where}; the {target}x target is judged on sm_{capability[0]}{capability[1]}+"
    )
    return Row(
        suite=SUITE,
        case=f"rollout {fmt}" + (" (compiled)" if compiled else ""),
        metric="images/s",
        value=images / t_q.median_s,
        baseline_name="bf16 compiled" if compiled else "bf16",
        baseline=images / t_b.median_s,
        ratio=ratio,
        target=f">= {target}x" if judged else "",
        met=ratio >= target if judged else None,
        note=note,
    )


def _dit_rows(device: torch.device, quick: bool) -> list[Row]:
    torch.manual_seed(0)
    if device.type == "cuda" and not quick:
        model = SanaDiT(SanaConfig.preset("1.6B")).to(device, torch.bfloat16).eval()
        qcfg, batch, steps, text_len = QuantConfig(), 4, 10, 300
    else:
        # Every tiny-preset Linear is <= 2240 wide: min_dim 0, or nothing would be quantized.
        # Quick: 16x16 latents (64 tokens), 2 images, 2 steps.
        tiny = SanaConfig.preset("tiny")
        tiny = dataclasses.replace(tiny, depth=2 if quick else 4, sample_size=16 if quick else 32)
        model = SanaDiT(tiny).to(device).eval()
        qcfg, batch, steps, text_len = QuantConfig(min_dim=0), 2 if quick else 4, 2 if quick else 10, 16
    cfg = model.cfg
    latent = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    text = torch.randn(batch, text_len, cfg.caption_channels, device=device)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    x = torch.randn(batch, *latent, device=device)
    t = torch.full((batch,), 500.0, device=device)
    sampler = SamplerConfig(steps=steps)
    where = f"{'1.6B' if cfg.hidden_size == 2240 else 'tiny'} DiT depth {cfg.depth}, batch {batch}, latent {latent}"
    base, _ = quantize_policy(model, dataclasses.replace(qcfg, fmt="bf16"))

    def roll(m: nn.Module) -> None:
        sample(m, seeds=list(range(batch)), text=text, text_mask=mask, cfg=sampler, latent_shape=latent)

    rows = []
    for fmt in FORMATS:
        qmodel, report = quantize_policy(model, dataclasses.replace(qcfg, fmt=fmt))
        t_q, t_b = _pair(
            quick, timed(device, qmodel, x, t, text, mask), timed(device, base, x, t, text, mask)
        )
        row = speed_row(SUITE, f"dit forward {fmt}", t_q, t_b, baseline_name="bf16", target=None)
        row.note = f"{where}; {len(report.replaced)} Linears quantized"
        rows.append(row)
        t_q, t_b = _pair(quick, timed(device, roll, qmodel), timed(device, roll, base))
        rows.append(_rollout_row(fmt, device, batch, t_q, t_b, f"{where}, {steps} steps"))
    if device.type == "cpu":
        # rollout.autocast: the same float32 copy with its products in bf16 (what `auto` picks on a CPU with
        # bf16 instructions); on one without them the ratio falls below 1.
        def roll_bf16(m: nn.Module) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                roll(m)

        t_a, t_b = _pair(quick, timed(device, roll_bf16, base), timed(device, roll, base))
        note = f"CPU bf16 products (rollout.autocast); {where}, {steps} steps"
        rows.append(_rollout_row("bf16 autocast (CPU)", device, batch, t_a, t_b, note))
    if device.type == "cuda" and not quick:
        rows += _compiled_rows(model, qcfg, base, where, steps, (x, t, text, mask), roll)
    return rows


def _compiled_rows(
    model: SanaDiT,
    qcfg: QuantConfig,
    base: nn.Module,
    where: str,
    steps: int,
    inputs: tuple[torch.Tensor, ...],
    roll: Callable[[nn.Module], None],
) -> list[Row]:
    """FP8 against BF16, both under torch.compile (`rollout.compile`): the quantizer fuses into its
    neighbours and the per-layer launch overhead goes, which eager FP8 pays on every Linear."""
    device = inputs[0].device
    qmodel, _ = quantize_policy(model, dataclasses.replace(qcfg, fmt="fp8"))
    cq, cb = torch.compile(qmodel), torch.compile(base)
    t_q, t_b = measure_pair(timed(device, cq, *inputs), timed(device, cb, *inputs), warmup=3, repeats=8)
    row = speed_row(SUITE, "dit forward fp8 (compiled)", t_q, t_b, baseline_name="bf16 compiled", target=None)
    row.note = where
    t_q, t_b = measure_pair(timed(device, roll, cq), timed(device, roll, cb), warmup=2, repeats=8)
    batch = inputs[0].shape[0]
    return [row, _rollout_row("fp8", device, batch, t_q, t_b, f"{where}, {steps} steps", compiled=True)]


def _memory_rows(device: torch.device, quick: bool) -> list[Row]:
    # One Sana 1.6B block with all embedders: every Linear shape of the real model. Whole-model bytes scale
    # the block's layers by the real depth (the blocks are identical). Quick mode leaves out w4a16, whose
    # storage is byte for byte that of nvfp4: quantizing a 1.6B block takes seconds on CPU.
    torch.manual_seed(0)
    full = SanaConfig.preset("1.6B")
    model = SanaDiT(dataclasses.replace(full, depth=1)).to(device).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # other storage, so loads really copy
    rows = []
    for fmt in FORMATS[:2] if quick else FORMATS:
        qmodel, report = quantize_policy(model, QuantConfig(fmt=fmt))
        got, bf16 = report.weight_bytes(replaced_only=True)
        packed = fmt != "fp8"
        rows.append(
            Row(
                suite=SUITE,
                case=f"weight bytes, quantized Linears {fmt}",
                metric="MiB (lower is better)",
                value=got / 2**20,
                baseline_name="bf16",
                baseline=bf16 / 2**20,
                ratio=got / bf16,
                target="<= 0.3x" if packed else "",
                met=got / bf16 <= 0.3 if packed else None,
                note=f"{report.bits_per_element():.3f} bits/element, one 1.6B block",
            )
        )
        blocks = [d for d in report.layers if d.name.startswith("blocks.")]
        rest = [d for d in report.layers if not d.name.startswith("blocks.")]
        copy_bytes = sum(d.bytes for d in rest) + full.depth * sum(d.bytes for d in blocks)
        bf16_bytes = sum(2 * d.in_features * d.out_features for d in rest)
        bf16_bytes += full.depth * sum(2 * d.in_features * d.out_features for d in blocks)
        rows.append(
            Row(
                suite=SUITE,
                case=f"weight bytes, all Linears of 1.6B {fmt}",
                metric="GiB (lower is better)",
                value=copy_bytes / 2**30,
                baseline_name="bf16",
                baseline=bf16_bytes / 2**30,
                ratio=copy_bytes / bf16_bytes,
                note=f"Sol-RL skips (qkv, embedders, final layer) stay BF16; {full.depth} blocks from 1 measured",
            )
        )
        # Re-quantization after a weight sync, against what a BF16 generator does instead: load the weights.
        # Quick: a single timed call each (quantizing a 1.6B block takes seconds on CPU).
        t_q, t_b = measure_pair(
            timed(device, requantize_, qmodel, state),
            timed(device, model.load_state_dict, state),
            warmup=0 if quick else 1,
            repeats=1 if quick else 5,
        )
        row = speed_row(
            SUITE, f"requantize on sync {fmt}", t_q, t_b, baseline_name="bf16 load_state_dict", target=None
        )
        row.note = f"one 1.6B block + embedders (the model has {full.depth} blocks), {device}"
        rows.append(row)
    return rows


def run(quick: bool) -> list[Row]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = _memory_rows(device, quick) + _gemm_rows(device, quick) + _dit_rows(device, quick)
    if device.type == "cpu":
        for r in rows:
            if not r.note.startswith("CPU"):
                r.note = f"CPU emulation; {r.note}" if r.note else "CPU emulation"
    return rows
