"""Triton W4A16 GEMM: `y = x @ dequant(W)^T + b` with NVFP4 weights unpacked inside the kernel.

The weight never exists in dense form in memory: each program loads packed bytes [BLOCK_N, BLOCK_K/2] and
their E4M3 block scales, decodes the E2M1 nibbles in registers, multiplies by the block scale (exact in
fp32), casts to the activation dtype and feeds the tensor cores with fp32 accumulation; the FP32 tensor
scale is applied once on the accumulator. This is what a GPU without FP4 tensor cores (Hopper, Ada) can
get from NVFP4: a quarter of the weight bandwidth, BF16 compute. Checked against `kernels.nvfp4` in
tests (under TRITON_INTERPRET=1 on CPU).

Imports triton at module level: only `kernels.w4a16` / `kernels.dispatch` import this module, lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.nvfp4 import NVFP4Tensor


@triton.jit
def _e2m1_to_f32(code):
    # code: int32 in 0..15. |value| = (2 + m) * 2^e / 4 for e >= 1 and m / 2 for e == 0.
    mag = code & 7
    e = mag >> 1
    m = mag & 1
    num = tl.where(e == 0, 2 * m, (2 + m) << e)
    value = num.to(tl.float32) * 0.25
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def _e4m3_to_f32(bits):
    # bits: int32 in 0..126 (block scales are non-negative and never NaN). Built from the bit pattern
    # rather than with a float8 cast: Triton has no float8e4nv conversion before sm_89 (A100).
    e = (bits >> 3) & 15
    m = bits & 7
    normal = ((e + 120) << 23) | (m << 20)  # fp32 exponent e - 7 + 127, mantissa m / 8
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))


@triton.jit
def _w4a16_kernel(
    x_ptr, p_ptr, s_ptr, ts_ptr, b_ptr, o_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_pn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)  # byte offsets inside a K tile
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + rb
        w_mask = n_ok[:, None] & (kb < K // 2)[None, :]
        byte = tl.load(p_ptr + rn[:, None] * stride_pn + kb[None, :], mask=w_mask, other=0).to(tl.int32)
        # Elements 2j and 2j+1 share byte j and both sit in block (2j) // 16 = j // 8.
        scale_bits = tl.load(s_ptr + rn[:, None] * stride_sn + (kb // 8)[None, :], mask=w_mask, other=0)
        scale = _e4m3_to_f32(scale_bits.to(tl.int32))
        lo = _e2m1_to_f32(byte & 15) * scale
        hi = _e2m1_to_f32(byte >> 4) * scale
        w = tl.interleave(lo, hi)  # [BLOCK_N, BLOCK_K]: low nibble is the even column
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_ok[:, None] & (kk < K)[None, :],
            other=0.0,
        )
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc = acc * tl.load(ts_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        o_ptr + rm[:, None] * stride_om + rn[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def w4a16_linear(
    x: torch.Tensor,
    w: NVFP4Tensor,
    bias: torch.Tensor | None,
    *,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """`x [..., K] @ w^T + b` -> [..., N] in x's dtype, NVFP4 weight unpacked inside the kernel."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"w4a16: x has {x.shape[-1]} features, weight expects {k}")
    if block_k % 32 != 0:
        raise ValueError(f"w4a16: block_k must be a multiple of 32 (two 16-wide blocks), got {block_k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a16_kernel[grid](
        x2, w.packed, w.block_scales.view(torch.uint8), w.tensor_scale.reshape(1), bias if bias is not None else out, out,
        m, n, k,
        x2.stride(0), x2.stride(1), w.packed.stride(0), w.block_scales.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)
