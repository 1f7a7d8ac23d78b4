"""Triton kernels against their PyTorch references, run by the Triton interpreter on CPU.

TRITON_INTERPRET=1 only takes full effect when it is set before triton is first imported (triton's own
`@jit` library functions, such as the combine function of `tl.sum`, are decorated at import time), and
the shared pytest process may already have imported triton. So the kernel checks run in a fresh
subprocess with the variable set; the test fails with the subprocess's output if any check fails.
The interpreter mishandles in-kernel fp32->bf16 casts, so bf16 is covered by tests/gpu; fp32 and fp16
are covered here. Speed is not measured here (bench/kernels.py does it on a GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import nvfp4, w4a16
from kernels.linear_attention import linear_attention_reference

ROOT = Path(__file__).resolve().parents[2]


def _check_w4a16(m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    from kernels.triton_w4a16 import w4a16_linear

    torch.manual_seed(0)
    # Rows spanning six decades: some E4M3 block scales are subnormal or 0, which the kernel decodes itself.
    w = nvfp4.quantize(torch.randn(n, k) * torch.logspace(-6, 0, n).unsqueeze(1))
    scales = w.block_scales.float()
    assert bool(((scales > 0) & (scales < 2**-6)).any()), "no subnormal block scale in the test weight"
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    # Small tiles: several programs along M and N, K loops that end on a partial tile (k=80, 96).
    got = w4a16_linear(x, w, b, block_m=16, block_n=16, block_k=32)
    ref = w4a16.linear_reference(x, w, b)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    # Per output column (= weight row), so that the 1e-6 rows are checked as closely as the large ones.
    col_err = (got.float() - ref.float()).abs().amax(dim=0) / ref.float().abs().amax(dim=0).clamp_min(1e-30)
    err = float(col_err.max())
    assert err < tol, f"w4a16 {m}x{n}x{k} {dtype}: max error {err:.2e} of a column's max |ref|"


def _check_w4a16_shapes() -> None:
    from kernels.triton_w4a16 import w4a16_linear

    torch.manual_seed(1)
    w = nvfp4.quantize(torch.randn(32, 64))
    x = torch.randn(2, 3, 64)
    got = w4a16_linear(x, w, None, block_m=16, block_n=32, block_k=64)
    assert torch.allclose(got, w4a16.linear_reference(x, w, None), atol=1e-4), "w4a16 with leading dims"
    try:
        w4a16_linear(torch.randn(2, 48), w, None)
    except ValueError as exc:
        assert "weight expects 64" in str(exc)
    else:
        raise AssertionError("w4a16 accepted a mismatched width")


def _check_linear_attention() -> None:
    from kernels.triton_linear_attention import linear_attention_triton

    torch.manual_seed(0)
    # q, k, v as strided views out of one fused projection, N=70 not a multiple of the 16-token tile.
    qkv = torch.randn(2, 70, 3, 3, 32).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, D]
    q, k, v = qkv[0], qkv[1], qkv[2]
    ref = linear_attention_reference(q, k, v)
    for split in (1, 3):
        got = linear_attention_triton(q, k, v, 1e-15, block_n=16, split=split)
        assert got.shape == (2, 3, 70, 32) and got.is_contiguous()
        err = float((got - ref).abs().max())
        assert err < 1e-5, f"linear attention split={split}: max error {err:.2e}"
    half = linear_attention_triton(q.half(), k.half(), v.half(), 1e-15, block_n=16)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), ref, atol=5e-3, rtol=5e-3), "linear attention fp16"


def _interpreted_checks() -> None:
    """Runs in the subprocess, with TRITON_INTERPRET=1 set before triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case in [
        (5, 48, 80, torch.float32, True),
        (33, 64, 128, torch.float32, False),
        (7, 32, 96, torch.float16, True),
    ]:
        _check_w4a16(*case)
    _check_w4a16_shapes()
    _check_linear_attention()
    print("interpreted kernel checks passed")


def test_triton_kernels_match_references_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.unit.test_kernels_triton import _interpreted_checks; _interpreted_checks()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreted kernel checks passed" in proc.stdout


def test_linear_attention_reference_is_the_formula() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 9, 16, dtype=torch.float64)
    q[0, 0, 4] = -1.0  # a query whose ReLU is all zero gets output 0 (eps keeps it finite)
    got = linear_attention_reference(q, k, v)
    for h in range(2):
        for i in range(9):
            num = sum(float(torch.relu(q[0, h, i]) @ torch.relu(k[0, h, j])) * v[0, h, j] for j in range(9))
            den = sum(float(torch.relu(q[0, h, i]) @ torch.relu(k[0, h, j])) for j in range(9))
            expected = num / (den + 1e-15) if den > 0 else torch.zeros(16, dtype=torch.float64)
            assert torch.allclose(got[0, h, i], expected, atol=1e-10)
    assert torch.equal(got[0, 0, 4], torch.zeros(16, dtype=torch.float64))
    bf = linear_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert bf.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="share one"):
        linear_attention_reference(q, k[..., :8], v)
