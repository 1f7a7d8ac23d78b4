"""Triton ReLU linear attention: split-N kv-state reduction, then a fused normalised output.

Pass 1, grid (B·heads, SPLIT): each program sums relu(K_j)^T V_j and relu(K_j) over its share of the
tokens into fp32 partials [B·heads, SPLIT, D, D] and [B·heads, SPLIT, D]. Splitting N keeps the GPU busy
when B·heads is small (one 1024-px image with 70 heads would otherwise be 70 programs).
Pass 2, grid (B·heads, N / BLOCK_N): each program adds up the SPLIT partials (a few KB), applies relu to
its query tile and writes `relu(Q)·KV / (relu(Q)·ksum + eps)` in the input dtype. Both passes accept
strided q/k/v views (e.g. straight out of a fused qkv projection). Reference: `kernels.linear_attention`.

Imports triton at module level: only `kernels.linear_attention` imports this module, lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_state_kernel(
    k_ptr, v_ptr, kv_ptr, ks_ptr,
    H, N, tokens_per_split,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    SPLIT: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    rd = tl.arange(0, D)
    rn = tl.arange(0, BLOCK_N)
    kv = tl.zeros((D, D), dtype=tl.float32)
    ksum = tl.zeros((D,), dtype=tl.float32)
    start = split * tokens_per_split
    for n0 in range(start, start + tokens_per_split, BLOCK_N):
        n = n0 + rn
        ok = ((n < N) & (n < start + tokens_per_split))[:, None]
        k = tl.load(k_ptr + b * s_kb + h * s_kh + n[:, None] * s_kn + rd[None, :] * s_kd, mask=ok, other=0.0)
        v = tl.load(v_ptr + b * s_vb + h * s_vh + n[:, None] * s_vn + rd[None, :] * s_vd, mask=ok, other=0.0)
        k = tl.maximum(k.to(tl.float32), 0.0)
        kv += tl.dot(tl.trans(k), v.to(tl.float32))
        ksum += tl.sum(k, axis=0)
    base = bh * SPLIT + split
    tl.store(kv_ptr + base * D * D + rd[:, None] * D + rd[None, :], kv)
    tl.store(ks_ptr + base * D + rd, ksum)


@triton.jit
def _output_kernel(
    q_ptr, kv_ptr, ks_ptr, o_ptr,
    H, N, eps,
    s_qb, s_qh, s_qn, s_qd,
    SPLIT: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = bh // H
    h = bh % H
    rd = tl.arange(0, D)
    kv = tl.zeros((D, D), dtype=tl.float32)
    ksum = tl.zeros((D,), dtype=tl.float32)
    for s in range(SPLIT):
        base = bh * SPLIT + s
        kv += tl.load(kv_ptr + base * D * D + rd[:, None] * D + rd[None, :])
        ksum += tl.load(ks_ptr + base * D + rd)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (n < N)[:, None]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + n[:, None] * s_qn + rd[None, :] * s_qd, mask=ok, other=0.0)
    q = tl.maximum(q.to(tl.float32), 0.0)
    num = tl.dot(q, kv)  # [BLOCK_N, D]
    den = tl.sum(q * ksum[None, :], axis=1)  # [BLOCK_N]
    out = num / (den[:, None] + eps)
    # Output is contiguous [B, H, N, D].
    tl.store(o_ptr + (bh * N + n[:, None]) * D + rd[None, :], out.to(o_ptr.dtype.element_ty), mask=ok)


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    *,
    block_n: int = 64,
    split: int | None = None,
) -> torch.Tensor:
    """q, k, v [B, heads, N, D] (D a power of two >= 16) -> contiguous output of the same shape and dtype."""
    bsz, heads, n, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"linear attention (triton): head_dim must be a power of two >= 16, got {d}")
    if split is None:
        # Enough programs to fill ~132 SMs when B·heads is small, never a split under one tile.
        split = max(1, min(triton.cdiv(n, block_n), triton.cdiv(256, bsz * heads)))
    per_split = triton.cdiv(triton.cdiv(n, split), block_n) * block_n
    kv = torch.empty((bsz * heads, split, d, d), dtype=torch.float32, device=q.device)
    ks = torch.empty((bsz * heads, split, d), dtype=torch.float32, device=q.device)
    _kv_state_kernel[(bsz * heads, split)](
        k, v, kv, ks, heads, n, per_split, *k.stride(), *v.stride(), SPLIT=split, D=d, BLOCK_N=block_n
    )
    out = torch.empty((bsz, heads, n, d), dtype=q.dtype, device=q.device)
    _output_kernel[(bsz * heads, triton.cdiv(n, block_n))](
        q, kv, ks, out, heads, n, eps, *q.stride(), SPLIT=split, D=d, BLOCK_N=block_n
    )
    return out
