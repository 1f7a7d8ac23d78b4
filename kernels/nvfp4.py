"""NVFP4 reference in PyTorch: E2M1 values, 16-element E4M3 block scales, an FP32 tensor scale.

`x ≈ q · s_block · s_tensor` with `s_tensor = amax(x) / (6·448)` and
`s_block = e4m3(amax(block) / (6·s_tensor))` (DESIGN.md section 6; NVIDIA's NVFP4 recipe). Blocks run
along the last (reduction, in_features) dimension. Two E2M1 codes share a byte, the even-indexed element
in the low nibble (the little-endian order of torch.float4_e2m1fn_x2 and cuBLAS), so storage is
4 + 8/16 = 4.5 bits an element plus one float per tensor.

Every other path (CPU emulation, the Triton W4A16 kernel, Blackwell `torch._scaled_mm`) is checked
against this file.

    w = torch.randn(64, 128)
    t = quantize(w)                     # NVFP4Tensor
    w_hat = dequantize(t)               # float32 [64, 128]
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

BLOCK = 16
"""Elements per block scale, along the reduction dimension."""
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of the 3-bit E2M1 codes 0..7; bit 3 of a code is the sign."""

# Midpoints between neighbouring grid values. A value exactly on midpoint k (between codes k and k+1)
# rounds to the even code: stay at k when k is even (strict >), move up when k is odd (>=).
_MIDPOINTS = tuple((a + b) / 2 for a, b in pairwise(E2M1_GRID))


@dataclass(kw_only=True, slots=True)
class NVFP4Tensor:
    """A weight (or activation) matrix in NVFP4, as stored by `QuantLinear`.

    Dequantized value of element (r, c): `e2m1(code(r, c)) · float(block_scales[r, c // 16]) · tensor_scale`.
    """

    packed: torch.Tensor  # uint8 [rows, cols // 2]; element 2j in the low nibble, 2j+1 in the high
    block_scales: torch.Tensor  # float8_e4m3fn [rows, cols // 16]
    tensor_scale: torch.Tensor  # float32 []
    shape: tuple[int, int]
    """(rows, cols) of the unpacked matrix: (out_features, in_features) for a weight."""

    def nbytes(self) -> int:
        """Storage in bytes: packed codes + block scales + the tensor scale (4.5 bits an element + 4 B)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.block_scales, self.tensor_scale))


def _check_matrix(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D matrix, got shape {tuple(x.shape)}")
    if x.shape[1] % BLOCK != 0:
        raise ValueError(f"{what}: last dim {x.shape[1]} is not a multiple of the NVFP4 block size {BLOCK}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating tensor, got {x.dtype}")


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (uint8 in 0..15): round-to-nearest-even, saturate at ±6.

    NaN has no E2M1 encoding; callers reject non-finite inputs before scaling.
    """
    mag = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for k, mid in enumerate(_MIDPOINTS):
        code += mag >= mid if k % 2 else mag > mid
    # Saturation falls out: anything above 5 (the last midpoint) is code 7 = 6.0.
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def _signed_grid(device: torch.device) -> torch.Tensor:
    """float32 [16]: the value of every E2M1 code."""
    return torch.tensor([*E2M1_GRID, *(-g for g in E2M1_GRID)], dtype=torch.float32, device=device)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) to float32 values."""
    return _signed_grid(code.device).index_select(0, code.reshape(-1).int()).view(code.shape)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, cols] -> bytes [rows, cols // 2], even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [rows, cols // 2] -> uint8 codes [rows, cols]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def compute_scales(x: torch.Tensor, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor and per-block scales of a [rows, cols] matrix.

    Returns (block_scales float8_e4m3fn [rows, cols // 16], tensor_scale float32 []). An all-zero
    matrix gets tensor_scale 1 so that nothing divides by zero; its blocks get scale 0.
    `check_finite=False` skips the inf/NaN check (a host sync on a GPU), as activations do.
    """
    _check_matrix(x, "nvfp4 input")
    x32 = x.float()
    block_amax = x32.abs().view(x.shape[0], -1, BLOCK).amax(dim=-1)  # float32 [rows, cols // 16]
    amax = block_amax.amax()
    if check_finite and not torch.isfinite(amax):
        raise ValueError("nvfp4 input: contains inf or NaN; refusing to quantize")
    # Tensor divisor: CUDA would multiply by a Python scalar's reciprocal (see fp8.quantize).
    tensor_scale = torch.where(
        amax > 0, amax / torch.full_like(amax, E2M1_MAX * E4M3_MAX), torch.ones_like(amax)
    )
    # <= 448 by construction up to float rounding; clamp so the cast can never overflow to NaN.
    block = (block_amax / (E2M1_MAX * tensor_scale)).clamp_(max=E4M3_MAX)
    return block.to(torch.float8_e4m3fn), tensor_scale


def _scaled_codes(x: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [rows, cols] of x under given scales. A block whose scale rounded to 0 encodes as 0."""
    rows, cols = x.shape
    denom = (block_scales.float() * tensor_scale).unsqueeze(-1)  # float32 [rows, cols // 16, 1]
    # A true division (not a multiply by 1/denom) so that values on an E2M1 midpoint stay exact ties.
    y = torch.where(denom > 0, x.float().view(rows, -1, BLOCK) / denom, 0.0)
    return e2m1_encode(y).view(rows, cols)


def quantize(x: torch.Tensor, *, out: NVFP4Tensor | None = None, check_finite: bool = True) -> NVFP4Tensor:
    """Quantize a [rows, cols] matrix (cols a multiple of 16) to NVFP4.

    With `out`, the result is copied into out's tensors (same shape required) and `out` is returned:
    re-quantization after a weight sync then keeps the module's buffers (their storage) unchanged.
    """
    block_scales, tensor_scale = compute_scales(x, check_finite)
    packed = pack(_scaled_codes(x, block_scales, tensor_scale))
    if out is None:
        return NVFP4Tensor(
            packed=packed,
            block_scales=block_scales,
            tensor_scale=tensor_scale,
            shape=(x.shape[0], x.shape[1]),
        )
    if out.shape != tuple(x.shape):
        raise ValueError(f"nvfp4 quantize: out has shape {out.shape}, input has {tuple(x.shape)}")
    out.packed.copy_(packed)
    out.block_scales.copy_(block_scales)
    out.tensor_scale.copy_(tensor_scale)
    return out


def dequantize(
    t: NVFP4Tensor, dtype: torch.dtype = torch.float32, *, tensor_scale: bool = True
) -> torch.Tensor:
    """NVFP4 -> dense [rows, cols]. Computed in float32 (every product is exact there), then cast.

    tensor_scale=False leaves the FP32 tensor scale out (e2m1 · block scale has at most 6 significant
    bits, so it is exact in bf16/fp16 too): GEMMs apply the tensor scale once on the fp32 accumulator.
    """
    rows, cols = t.shape
    # One lookup per byte into a [256, 2] table of (low, high) values: 5x faster than unpack + decode.
    byte = torch.arange(256, device=t.packed.device)
    grid = _signed_grid(t.packed.device)
    pairs = torch.stack((grid[byte & 15], grid[byte >> 4]), dim=-1)  # float32 [256, 2]
    values = pairs.index_select(0, t.packed.reshape(-1).int()).view(rows, -1, BLOCK)
    scale = t.block_scales.float().unsqueeze(-1)
    if tensor_scale:
        scale = scale * t.tensor_scale
    return values.mul_(scale).view(rows, cols).to(dtype)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Round activations [..., K] to NVFP4 values (quantize then dequantize), same dtype as x.

    This is the activation side of W4A4: on Blackwell the activation is quantized on the fly with a
    per-call tensor scale and 16-wide block scales along K, exactly as here. Feeding the result to a
    W4A16 GEMM gives W4A4 numerics up to one rounding of each activation to x's dtype.
    """
    return dequantize(quantize(x.reshape(-1, x.shape[-1]), check_finite=False)).reshape(x.shape).to(x.dtype)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Block scales [rows, cols // 16] -> cuBLAS's swizzled 128x4-tile layout that FP4 `_scaled_mm` reads.

    Pads rows to 128 and scale columns to 4 with zeros. Layout: docs.nvidia.com/cuda/cublas,
    "1D block scaling factors layout".
    """
    rows, cols = scales.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros((pr, pc), dtype=torch.uint8, device=scales.device)
    padded[:rows, :cols] = scales.view(torch.uint8)
    tiles = padded.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)
    swizzled = tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16)
    return swizzled.flatten().view(torch.float8_e4m3fn)


def linear_scaled_mm(x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W4A4 `x @ w^T + b` on Blackwell FP4 tensor cores via `torch._scaled_mm` (compute capability >= 10).

    The activation is quantized per call (its own tensor scale); the two tensor scales multiply the
    bf16 output. Not exercised on this project's CI (no Blackwell): tests/gpu compares it with the
    emulation when such a GPU is present.
    """
    rows, k = w.shape
    x2 = x.reshape(-1, k)
    xq = quantize(x2, check_finite=False)
    fp4 = torch.float4_e2m1fn_x2
    y = torch._scaled_mm(
        xq.packed.view(fp4),
        w.packed.view(fp4).t(),
        scale_a=to_blocked(xq.block_scales),
        scale_b=to_blocked(w.block_scales),
        out_dtype=torch.bfloat16,
    )
    y = y.float() * (xq.tensor_scale * w.tensor_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)
