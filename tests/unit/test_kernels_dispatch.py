"""Kernel dispatch: which implementation each (format, device) gets, and that it says so."""

from __future__ import annotations

import logging

import pytest
import torch

from kernels import dispatch, fp8, nvfp4, w4a16
from kernels.linear_attention import linear_attention, linear_attention_reference


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "w4a16"])
def test_cpu_picks_emulation_and_says_so(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    dispatch.pick.cache_clear()
    with caplog.at_level(logging.INFO, logger="sana_rl.kernels"):
        choice = dispatch.pick(fmt, torch.device("cpu"))
        dispatch.pick(fmt, torch.device("cpu"))
    assert choice.impl == f"{fmt}-emulated" and choice.device == "cpu"
    assert str(choice).startswith(f"{fmt} on cpu: {fmt}-emulated (no GPU")
    logged = [r.getMessage() for r in caplog.records if r.name == "sana_rl.kernels"]
    assert logged == [f"quantized linear: {choice}"]  # once per (format, device), not per call


@pytest.mark.parametrize(
    ("fmt", "capability", "triton", "impl"),
    [
        ("nvfp4", (10, 0), True, "nvfp4-scaled_mm"),
        ("nvfp4", (9, 0), True, "nvfp4-w4a16-triton"),
        ("nvfp4", (9, 0), False, "nvfp4-emulated"),
        ("fp8", (9, 0), True, "fp8-scaled_mm"),
        ("fp8", (8, 9), False, "fp8-scaled_mm"),
        ("fp8", (8, 0), True, "fp8-emulated"),
        ("w4a16", (9, 0), True, "w4a16-triton"),
        ("w4a16", (12, 0), False, "w4a16-emulated"),
    ],
)
def test_gpu_table(
    monkeypatch: pytest.MonkeyPatch, fmt: str, capability: tuple[int, int], triton: bool, impl: str
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: triton)
    got, reason = dispatch._decide(fmt, torch.device("cuda", 0))
    assert got == impl and got in dispatch.IMPLS
    assert f"sm_{capability[0]}{capability[1]}" in reason


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="'bf16'"):
        dispatch._decide("bf16", torch.device("cpu"))


def test_emulated_paths_compute_the_format_numerics() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 64), torch.randn(32, 64), torch.randn(32)
    cpu = torch.device("cpu")
    q4 = nvfp4.quantize(w)
    y4 = dispatch.run(dispatch.pick("nvfp4", cpu), x, q4, b)
    # W4A4: both operands on the NVFP4 grid, so the result is an exact fp32 GEMM of dequantized values.
    expected = nvfp4.fake_quantize(x) @ nvfp4.dequantize(q4).t() + b
    assert torch.allclose(y4, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(dispatch.run(dispatch.pick("w4a16", cpu), x, q4, b), w4a16.linear_reference(x, q4, b))
    q8 = fp8.quantize(w)
    assert torch.equal(dispatch.run(dispatch.pick("fp8", cpu), x, q8, b), fp8.linear_emulated(x, q8, b))


def test_linear_attention_uses_reference_on_cpu() -> None:
    q, k, v = torch.randn(3, 1, 2, 20, 32)
    assert torch.equal(linear_attention(q, k, v), linear_attention_reference(q, k, v))
