"""ReLU linear attention, Sana's self-attention (DESIGN.md section 2), reference and dispatch.

    O_i = relu(Q_i) · KV / (relu(Q_i) · ksum + eps),   KV = Σ_j relu(K_j)^T V_j,   ksum = Σ_j relu(K_j)

computed in fp32 whatever the input dtype (the denominator is a sum of N non-negative terms that bf16
would round badly), returned in the input dtype. eps = 1e-15 as in Sana: a query whose ReLU is all zero
gets output 0. The Triton kernel (`kernels.triton_linear_attention`) evaluates the same formula with a
split-N kv-state reduction and a fused normalised output; `linear_attention` picks it on CUDA when
triton is installed and uses the reference elsewhere.

    q = k = v = torch.randn(2, 4, 64, 32)   # [B, heads, N, head_dim]
    o = linear_attention(q, k, v)           # [2, 4, 64, 32]
"""

from __future__ import annotations

import functools
import importlib.util

import torch

EPS = 1e-15


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"linear attention: q, k, v must share one [B, heads, N, head_dim] shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """The formula above in plain PyTorch, fp32 accumulation. q, k, v: [B, heads, N, D] -> same shape."""
    _check(q, k, v)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    qf, kf, vf = torch.relu(q.to(acc)), torch.relu(k.to(acc)), v.to(acc)
    kv = torch.einsum("bhnd,bhne->bhde", kf, vf)  # float32 [B, heads, D, D]
    ksum = kf.sum(dim=2)  # float32 [B, heads, D]
    num = torch.einsum("bhnd,bhde->bhne", qf, kv)
    den = torch.einsum("bhnd,bhd->bhn", qf, ksum).unsqueeze(-1)
    return (num / (den + eps)).to(q.dtype)


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """ReLU linear attention: the Triton kernel on CUDA (head_dim a power of two >= 16), else the reference."""
    _check(q, k, v)
    d = q.shape[-1]
    if q.is_cuda and _triton_available() and d >= 16 and d & (d - 1) == 0:
        from kernels.triton_linear_attention import linear_attention_triton

        return linear_attention_triton(q, k, v, eps)
    return linear_attention_reference(q, k, v, eps)
