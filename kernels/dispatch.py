"""Picks the GEMM implementation for a quantized linear from the format and the device, and says which.

| format | Blackwell (sm_100+)            | Hopper / Ada (sm_89, sm_90)                 | older GPU / CPU |
|--------|--------------------------------|---------------------------------------------|-----------------|
| nvfp4  | `_scaled_mm` FP4 (W4A4)        | FP4-rounded activations + Triton W4A16      | emulated        |
| fp8    | `_scaled_mm` FP8 (W8A8)        | `_scaled_mm` FP8 (W8A8)                     | emulated        |
| w4a16  | Triton W4A16                   | Triton W4A16                                | emulated        |

"emulated" is dequantize + fp32 matmul with the same rounding as the hardware path, so CPU tests and the
CPU demo exercise the real formats. Transformer Engine is not used: its NVFP4 path wants its own modules
and recipe objects, while `_scaled_mm` consumes our packed buffers as they are. The choice is logged once
per (format, device) on the `sana_rl.kernels` logger.

    choice = pick("nvfp4", torch.device("cpu"))
    str(choice)   # 'nvfp4 on cpu: nvfp4-emulated (no GPU: ...)'
    y = run(choice, x, weight, bias)
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import fp8, nvfp4, w4a16
from kernels.fp8 import FP8Tensor
from kernels.nvfp4 import NVFP4Tensor

log = logging.getLogger("sana_rl.kernels")

QuantWeight = NVFP4Tensor | FP8Tensor


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """The implementation a (format, device) pair runs, and why."""

    fmt: str
    device: str
    impl: str
    """Key of `IMPLS`, e.g. 'fp8-scaled_mm' or 'nvfp4-emulated'."""
    reason: str

    def __str__(self) -> str:
        return f"{self.fmt} on {self.device}: {self.impl} ({self.reason})"


def _triton_w4a16(x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from kernels.triton_w4a16 import w4a16_linear

    return w4a16_linear(x, w, bias)


# Each takes (x [..., K], weight, bias [N] | None) and returns [..., N] in x.dtype.
IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "nvfp4-scaled_mm": nvfp4.linear_scaled_mm,
    "nvfp4-w4a16-triton": lambda x, w, b: _triton_w4a16(nvfp4.fake_quantize(x), w, b),
    "nvfp4-emulated": lambda x, w, b: w4a16.linear_reference(nvfp4.fake_quantize(x), w, b),
    "fp8-scaled_mm": fp8.linear_scaled_mm,
    "fp8-emulated": fp8.linear_emulated,
    "w4a16-triton": _triton_w4a16,
    "w4a16-emulated": w4a16.linear_reference,
}


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _decide(fmt: str, device: torch.device) -> tuple[str, str]:
    if fmt not in ("nvfp4", "fp8", "w4a16"):
        raise ValueError(
            f"kernel dispatch: no quantized GEMM for format {fmt!r} (bf16 layers are plain nn.Linear)"
        )
    if device.type != "cuda":
        return (
            f"{fmt}-emulated",
            f"no GPU ({device.type}): dequantize + fp32 matmul, same rounding as hardware",
        )
    major, minor = torch.cuda.get_device_capability(device)
    sm = f"sm_{major}{minor}"
    if fmt == "fp8":
        if (major, minor) >= (8, 9):
            return "fp8-scaled_mm", f"{sm} has FP8 tensor cores"
        return "fp8-emulated", f"{sm} has no FP8 tensor cores"
    if fmt == "nvfp4" and major >= 10 and hasattr(torch, "float4_e2m1fn_x2"):
        return "nvfp4-scaled_mm", f"{sm} has FP4 tensor cores"
    if _triton_installed():
        if fmt == "nvfp4":
            return (
                "nvfp4-w4a16-triton",
                f"{sm} has no FP4 tensor cores: FP4-rounded activations, W4A16 kernel",
            )
        return "w4a16-triton", f"{sm}: weights unpacked inside the Triton GEMM"
    return f"{fmt}-emulated", f"{sm}: triton is not installed"


@functools.cache
def pick(fmt: str, device: torch.device) -> KernelChoice:
    """The implementation for `fmt` on `device`; logged (INFO) the first time each pair is asked for."""
    impl, reason = _decide(fmt, device)
    choice = KernelChoice(fmt=fmt, device=str(device), impl=impl, reason=reason)
    log.info("quantized linear: %s", choice)
    return choice


@torch.compiler.assume_constant_result
def _impl_name(fmt: str, device: torch.device) -> str:
    return pick(fmt, device).impl


def linear(fmt: str, x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight^T + bias` with the implementation `pick` chooses for x's device. torch.compile takes the
    choice as a constant, so a compiled rollout copy traces through every quantized layer unbroken."""
    return IMPLS[_impl_name(fmt, x.device)](x, weight, bias)


def run(
    choice: KernelChoice, x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """Evaluate `x @ weight^T + bias` with the chosen implementation."""
    return IMPLS[choice.impl](x, weight, bias)
