"""Kernels on a real GPU: compiled Triton kernels in bf16, `_scaled_mm` FP8/FP4 paths, and their speed.

Each hardware path is compared with the CPU-verified emulation of the same format. Skipped without CUDA
(and the FP8 / FP4 cases without the compute capability they need).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from kernels import dispatch, fp8, nvfp4, w4a16
from kernels.linear_attention import linear_attention, linear_attention_reference
from kernels.quantize import QuantLinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _median_s(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_w4a16_triton_bf16_matches_reference_and_beats_it() -> None:
    from kernels.triton_w4a16 import w4a16_linear

    torch.manual_seed(0)
    w = nvfp4.quantize(torch.randn(4480, 2240, device="cuda"))
    x = torch.randn(1024, 2240, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4480, device="cuda", dtype=torch.bfloat16)
    got, ref = w4a16_linear(x, w, bias), w4a16.linear_reference(x, w, bias)
    assert got.dtype == torch.bfloat16
    assert _rel(got, ref) < 1e-2  # both accumulate in fp32; bf16 output rounding differs at most
    # Speed: the kernel never materialises the dense weight, the reference does on every call.
    t_kernel = _median_s(lambda: w4a16_linear(x, w, bias))
    t_ref = _median_s(lambda: w4a16.linear_reference(x, w, bias))
    assert t_kernel < t_ref, f"triton W4A16 {t_kernel * 1e3:.3f} ms vs reference {t_ref * 1e3:.3f} ms"


def test_linear_attention_triton_bf16_matches_reference_and_beats_it() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 1024, 3, 70, 32, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # strided [B, heads, N, D] views, as from a fused projection
    got, ref = linear_attention(q, k, v), linear_attention_reference(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    assert _rel(got, ref) < 1e-2
    t_kernel = _median_s(lambda: linear_attention(q, k, v))
    t_ref = _median_s(lambda: linear_attention_reference(q, k, v))
    assert t_kernel < t_ref, (
        f"triton linear attention {t_kernel * 1e3:.3f} ms vs reference {t_ref * 1e3:.3f} ms"
    )


@pytest.mark.skipif(_capability() < (8, 9), reason="FP8 tensor cores need compute capability >= 8.9")
@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_scaled_mm_matches_emulation(per_row: bool) -> None:
    torch.manual_seed(0)
    w = fp8.quantize(torch.randn(2240, 5600, device="cuda"), per_row=per_row)
    x = torch.randn(512, 5600, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(2240, device="cuda", dtype=torch.bfloat16)
    got, ref = fp8.linear_scaled_mm(x, w, bias), fp8.linear_emulated(x, w, bias)
    assert _rel(got, ref) < 1e-2
    assert dispatch.pick("fp8", x.device).impl == "fp8-scaled_mm"


@pytest.mark.skipif(
    _capability() < (10, 0) or not hasattr(torch, "float4_e2m1fn_x2"), reason="FP4 tensor cores need sm_100+"
)
def test_nvfp4_scaled_mm_matches_emulation() -> None:
    torch.manual_seed(0)
    w = nvfp4.quantize(torch.randn(2240, 5600, device="cuda"))
    x = torch.randn(256, 5600, device="cuda", dtype=torch.bfloat16)
    got = nvfp4.linear_scaled_mm(x, w, None)
    ref = w4a16.linear_reference(nvfp4.fake_quantize(x.float()), w, None)
    assert _rel(got, ref) < 1e-2  # same FP4 operands: only accumulation order and bf16 output differ
    assert dispatch.pick("nvfp4", x.device).impl == "nvfp4-scaled_mm"


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "w4a16"])
def test_quant_linear_on_gpu_matches_cpu_emulation(fmt: str) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(2240, 4480)
    x = torch.randn(64, 2240)
    cpu = QuantLinear.from_linear(lin, fmt)  # type: ignore[arg-type]
    gpu = QuantLinear.from_linear(lin.cuda(), fmt)  # type: ignore[arg-type]
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu.state_dict().values(), cpu.state_dict().values()))
    xb = x.bfloat16()  # both sides see the same BF16 activations (NVFP4 rounds them again to FP4 blocks)
    got = gpu(xb.cuda())
    assert got.dtype == torch.bfloat16
    assert _rel(got.cpu(), cpu(xb)) < 2e-2, str(dispatch.pick(fmt, got.device))
