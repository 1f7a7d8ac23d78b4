"""NVFP4 reference: E2M1 rounding, scales, packing, storage size and error (kernels/nvfp4.py)."""

from __future__ import annotations

import pytest
import torch

from kernels import nvfp4

GRID = torch.tensor(nvfp4.E2M1_GRID)


def _round_trip_scaled(values: list[float]) -> torch.Tensor:
    """E2M1 rounding of already-scaled values (no block scaling in the way)."""
    return nvfp4.e2m1_decode(nvfp4.e2m1_encode(torch.tensor(values)))


def test_grid_values_round_trip_exactly() -> None:
    values = torch.cat([GRID, -GRID[1:]])
    assert torch.equal(_round_trip_scaled(values.tolist()), values)
    # Through the full quantizer too: a block whose amax is 6 gets tensor scale 6/2688 and block scale 448.
    w = values.repeat(2)[:16].repeat(4, 1)
    w[:, 0] = 6.0
    assert torch.equal(nvfp4.dequantize(nvfp4.quantize(w)), w)


@pytest.mark.parametrize(
    ("x", "expected"),
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)],
)
def test_ties_round_to_even_code(x: float, expected: float) -> None:
    assert _round_trip_scaled([x, -x]).tolist() == [expected, -expected]


def test_non_ties_round_to_nearest() -> None:
    got = _round_trip_scaled([0.26, 0.74, 2.49, 2.51, 4.9, 5.1, 0.2])
    assert got.tolist() == [0.5, 0.5, 2.0, 3.0, 4.0, 6.0, 0.0]


def test_saturates_at_six() -> None:
    assert _round_trip_scaled([6.0, 7.0, 1e6, -9.0]).tolist() == [6.0, 6.0, 6.0, -6.0]


def test_block_scales_follow_the_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.logspace(-2, 1, 8).unsqueeze(1)
    block_scales, tensor_scale = nvfp4.compute_scales(w)
    amax = w.abs().max()
    assert tensor_scale.dtype == torch.float32 and tensor_scale.dim() == 0
    assert torch.allclose(tensor_scale, amax / (6 * 448))
    block_amax = w.abs().view(8, 4, 16).amax(-1)
    expected = (block_amax / (6 * tensor_scale)).to(torch.float8_e4m3fn)
    assert block_scales.dtype == torch.float8_e4m3fn
    assert torch.equal(block_scales.float(), expected.float())
    assert block_scales.float().max() == 448.0  # the block holding amax uses the whole E4M3 range


def test_scaled_values_above_six_saturate_inside_a_block() -> None:
    # amax(block)/(6·s_tensor) rounds down in E4M3 (e.g. 300 -> 288), so the block's amax scales above 6.
    w = torch.zeros(1, 32)
    w[0, 0] = 448.0 * 6  # tensor amax: block 0 scale is exactly 448
    w[0, 16] = 300.0 * 6  # block 1: 300 is not an E4M3 value
    t = nvfp4.quantize(w)
    s_tensor = float(t.tensor_scale)
    s_block1 = float(t.block_scales[0, 1].float())
    assert s_block1 * 6 * s_tensor < w[0, 16]  # really scaled above 6
    assert float(nvfp4.dequantize(t)[0, 16]) == pytest.approx(6 * s_block1 * s_tensor)


def test_pack_unpack_and_nibble_order() -> None:
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    packed = nvfp4.pack(codes)
    assert packed.shape == (5, 16) and packed.dtype == torch.uint8
    assert torch.equal(nvfp4.unpack(packed), codes)
    assert torch.equal(packed[:, 3] & 0xF, codes[:, 6]) and torch.equal(packed[:, 3] >> 4, codes[:, 7])


def test_storage_is_four_and_a_half_bits() -> None:
    w = torch.randn(256, 1024)
    t = nvfp4.quantize(w)
    assert t.packed.shape == (256, 512) and t.block_scales.shape == (256, 64)
    bits = 8 * t.nbytes() / w.numel()
    assert bits == pytest.approx(4.5 + 32 / w.numel())


def test_dequantized_error_is_bounded() -> None:
    torch.manual_seed(1)
    w = torch.randn(128, 256) * 0.02
    w_hat = nvfp4.dequantize(nvfp4.quantize(w))
    rel = float((w_hat - w).norm() / w.norm())
    # E2M1 with per-16 scales: about 9-10% RMS error on Gaussian weights; far more means a broken scale.
    assert 0.05 < rel < 0.13
    # Every element sits within half a grid step (1.0 at the top of the grid) of its scaled value.
    t = nvfp4.quantize(w)
    scale = (t.block_scales.float() * t.tensor_scale).repeat_interleave(16, dim=1)
    assert float(((w_hat - w).abs() / scale).max()) <= 1.0 + 1e-5


def test_zero_tensor_and_zero_blocks() -> None:
    t = nvfp4.quantize(torch.zeros(4, 32))
    assert float(t.tensor_scale) == 1.0
    assert torch.equal(nvfp4.dequantize(t), torch.zeros(4, 32))
    w = torch.zeros(2, 32)
    w[0, 0] = 1.0
    w[1, 20] = 1e-9  # its block scale underflows E4M3 and must encode as 0, not NaN
    out = nvfp4.dequantize(nvfp4.quantize(w))
    assert torch.isfinite(out).all() and out[0, 0] == 1.0 and out[1, 20] == 0.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of the NVFP4 block size"):
        nvfp4.quantize(torch.randn(4, 24))
    with pytest.raises(ValueError, match="inf or NaN"):
        nvfp4.quantize(torch.full((2, 16), float("nan")))
    with pytest.raises(ValueError, match="2-D"):
        nvfp4.quantize(torch.randn(16))


def test_quantize_into_existing_storage() -> None:
    t = nvfp4.quantize(torch.randn(8, 32))
    ptrs = (t.packed.data_ptr(), t.block_scales.data_ptr(), t.tensor_scale.data_ptr())
    w2 = torch.randn(8, 32) * 3
    nvfp4.quantize(w2, out=t)
    assert (t.packed.data_ptr(), t.block_scales.data_ptr(), t.tensor_scale.data_ptr()) == ptrs
    assert torch.equal(nvfp4.dequantize(t), nvfp4.dequantize(nvfp4.quantize(w2)))


def test_fake_quantize_activations_keeps_shape_and_dtype() -> None:
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    y = nvfp4.fake_quantize(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(
        y[1, 3], nvfp4.dequantize(nvfp4.quantize(x[1].float()))[3].double()
    )  # row-blocked, shared scale


def test_to_blocked_matches_the_cublas_offset_formula() -> None:
    # cuBLAS block-scaling layout: in each 128x4 tile, (row, col) goes to (row % 32)·16 + (row // 32)·4 + col.
    rows, cols = 256, 8
    values = torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols)
    scales = (values % 255).to(torch.uint8).view(torch.float8_e4m3fn)
    flat = nvfp4.to_blocked(scales).view(torch.uint8)
    col_tiles = cols // 4
    for r, c in [(0, 0), (1, 0), (33, 2), (127, 3), (128, 0), (200, 5), (255, 7)]:
        tile = (r // 128) * col_tiles + c // 4
        offset = tile * 512 + (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4
        assert int(flat[offset]) == int(values[r, c] % 255)


def _unswizzle(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of to_blocked by the cuBLAS offset formula: [rows, cols] scales from the flat buffer."""
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    tile = (r // 128) * (-(-cols // 4)) + c // 4
    offset = tile * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4
    return flat.view(torch.uint8)[offset].view(torch.float8_e4m3fn)


def test_scaled_mm_call_is_what_cublas_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    # No FP4 tensor cores here: a stand-in `_scaled_mm` decodes its operands the way cuBLAS documents
    # (column-major B, swizzled E4M3 block scales) so the Blackwell path's plumbing runs on CPU.
    def fake_scaled_mm(
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        scale_a: torch.Tensor,
        scale_b: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        fp4 = torch.float4_e2m1fn_x2
        assert a.dtype == b.dtype == fp4 and b.stride(0) == 1  # B column-major
        k = 2 * a.shape[1]

        def dense(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            values = nvfp4.e2m1_decode(nvfp4.unpack(packed.contiguous().view(torch.uint8)))
            block = _unswizzle(scales, packed.shape[0], k // 16).float()
            return values * block.repeat_interleave(16, dim=1)

        return (dense(a, scale_a) @ dense(b.t(), scale_b).t()).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    torch.manual_seed(0)
    w = nvfp4.quantize(torch.randn(144, 64))
    x, b = torch.randn(3, 7, 64), torch.randn(144)
    got = nvfp4.linear_scaled_mm(x, w, b)
    expected = nvfp4.fake_quantize(x) @ nvfp4.dequantize(w).t() + b
    assert got.shape == (3, 7, 144)
    assert float((got - expected).norm() / expected.norm()) < 1e-2  # bf16 output rounding only
