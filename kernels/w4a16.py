"""Weight-only FP4 (W4A16) linear: NVFP4 weights, activations in their own dtype. PyTorch reference.

The reference follows the Triton kernel's (`kernels.triton_w4a16`) order of operations, so the two agree
to accumulation order: the weight is decoded with its E4M3 block scales (exact in bf16/fp16/fp32),
cast to the activation dtype, multiplied in fp32, and the FP32 tensor scale is applied once on the
accumulator. W4A4 (NVFP4 on hardware without FP4 tensor cores) is this GEMM fed with
`nvfp4.fake_quantize(x)`.

    w = nvfp4.quantize(torch.randn(64, 128))
    y = linear_reference(torch.randn(4, 128), w, None)  # float32 [4, 64]
"""

from __future__ import annotations

import torch

from kernels.nvfp4 import NVFP4Tensor, dequantize


def linear_reference(x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x [..., K] @ w^T + b` -> [..., N] in x's dtype, weight-only NVFP4."""
    rows, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"w4a16: x has {x.shape[-1]} features, weight expects {k}")
    w_blocks = dequantize(w, x.dtype, tensor_scale=False)  # x.dtype [N, K], exact
    y = (x.reshape(-1, k).float() @ w_blocks.float().t()) * w.tensor_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)
