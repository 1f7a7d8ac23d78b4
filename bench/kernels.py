"""Triton kernels against their PyTorch references, at Sana 1.6B shapes. GPU only.

    sana-rl bench kernels            # on a CUDA machine
    sana-rl bench kernels --quick    # fewer repeats

- Linear attention: `kernels.triton_linear_attention` vs `linear_attention_reference` (PyTorch, fp32
  accumulation), bf16 q/k/v [B, 70 heads, 1024 tokens, 32].
- W4A16: the Triton GEMM vs the PyTorch W4A16 reference (dequantize + matmul) and vs a dense bf16 Linear,
  at Sana's Linear shapes with 1024 tokens.
Without a GPU the Triton kernels cannot run at speed (the interpreter is for correctness only): the suite
returns one row per case saying so, with no number.
"""

from __future__ import annotations

import torch

from bench.harness import Row, measure_pair, speed_row
from bench.lowprec import timed
from kernels import nvfp4, w4a16
from kernels.linear_attention import linear_attention_reference

SUITE = "kernels"
ATTN_BATCHES = (1, 4)
SANA_GEMMS = ((2240, 11200), (5600, 2240), (2240, 4480))
TOKENS = 1024
HEADS, HEAD_DIM = 70, 32


def _cases() -> list[str]:
    return [f"linear attention B={b}" for b in ATTN_BATCHES] + [
        f"w4a16 {fin}x{fout} vs {base}" for fin, fout in SANA_GEMMS for base in ("reference", "bf16")
    ]


def _skipped(reason: str) -> list[Row]:
    return [
        Row(suite=SUITE, case=case, metric="skipped", value=float("nan"), note=reason) for case in _cases()
    ]


def run(quick: bool) -> list[Row]:
    if not torch.cuda.is_available():
        return _skipped(
            "needs a CUDA GPU: Triton kernels do not compile for CPU (tests run them interpreted)"
        )
    try:
        from kernels.triton_linear_attention import linear_attention_triton
        from kernels.triton_w4a16 import w4a16_linear
    except ImportError as exc:
        return _skipped(f"triton is not importable: {exc}")
    reps = dict(warmup=3, repeats=5) if quick else dict(warmup=10, repeats=30)
    dev = torch.device("cuda")
    rows = []
    for b in ATTN_BATCHES:
        torch.manual_seed(0)
        q, k, v = torch.randn(3, b, HEADS, TOKENS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        ours, base = measure_pair(
            timed(dev, linear_attention_triton, q, k, v, 1e-15),
            timed(dev, linear_attention_reference, q, k, v),
            **reps,
        )
        err = float(
            (linear_attention_triton(q, k, v, 1e-15).float() - linear_attention_reference(q, k, v).float())
            .abs()
            .max()
        )
        row = speed_row(
            SUITE, f"linear attention B={b}", ours, base, baseline_name="pytorch reference", target=1.0
        )
        row.note = f"bf16 [{b}, {HEADS}, {TOKENS}, {HEAD_DIM}], max abs diff {err:.2e}"
        rows.append(row)
    for fin, fout in SANA_GEMMS:
        torch.manual_seed(0)
        dense = torch.nn.Linear(fin, fout, device=dev, dtype=torch.bfloat16)
        w = nvfp4.quantize(dense.weight.detach())
        x = torch.randn(TOKENS, fin, device=dev, dtype=torch.bfloat16)
        kernel = timed(dev, w4a16_linear, x, w, dense.bias)
        baselines = {
            "reference": timed(dev, w4a16.linear_reference, x, w, dense.bias),
            "bf16": timed(dev, dense, x),
        }
        for name, base_fn in baselines.items():
            ours, base = measure_pair(kernel, base_fn, **reps)
            target = 1.0 if name == "reference" else None
            row = speed_row(
                SUITE, f"w4a16 {fin}x{fout} vs {name}", ours, base, baseline_name=name, target=target
            )
            row.note = f"{TOKENS} tokens, bf16 activations"
            rows.append(row)
    return rows
