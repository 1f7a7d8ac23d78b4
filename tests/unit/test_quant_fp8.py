"""FP8 E4M3 reference and its CPU GEMM emulation (kernels/fp8.py)."""

from __future__ import annotations

import pytest
import torch

from kernels import fp8


@pytest.mark.parametrize("per_row", [True, False])
def test_quantize_matches_torch_float8_cast(per_row: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.logspace(-3, 1, 32).unsqueeze(1)
    t = fp8.quantize(w, per_row=per_row)
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    scale = amax / 448.0
    assert t.scale.shape == ((32, 1) if per_row else ())
    assert torch.equal(t.scale, scale)
    assert torch.equal(t.data.view(torch.uint8), (w / scale).to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(fp8.dequantize(t), (w / scale).to(torch.float8_e4m3fn).float() * scale)


def test_per_row_scales_keep_small_rows_accurate() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[0] *= 1e-5  # a tiny row next to normal ones
    row_err = (fp8.dequantize(fp8.quantize(w, per_row=True))[0] - w[0]).norm() / w[0].norm()
    tensor_err = (fp8.dequantize(fp8.quantize(w, per_row=False))[0] - w[0]).norm() / w[0].norm()
    assert row_err < 0.05
    assert tensor_err > 0.3  # per-tensor scaling pushes the tiny row into E4M3 subnormals


def test_saturation_zero_rows_and_bad_input() -> None:
    w = torch.zeros(2, 16)
    w[0, :3] = torch.tensor([1.0, -2.0, 0.0])
    t = fp8.quantize(w, per_row=True)
    assert float(t.scale[1]) == 1.0 and torch.equal(fp8.dequantize(t), w)
    assert float(t.data.float().abs().max()) == 448.0
    with pytest.raises(ValueError, match="inf or NaN"):
        fp8.quantize(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize(torch.randn(3))


def test_emulated_gemm_is_the_scaled_mm_formula() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 64), torch.randn(48, 64), torch.randn(48)
    wq = fp8.quantize(w, per_row=True)
    y = fp8.linear_emulated(x, wq, b)
    assert y.shape == (3, 5, 48) and y.dtype == x.dtype
    xq = fp8.quantize(x.reshape(15, 64), per_row=True)  # per-token activations with a per-row weight
    expected = (xq.data.float() @ wq.data.float().t()) * xq.scale * wq.scale.t() + b
    assert torch.allclose(y.reshape(15, 48), expected, atol=1e-5, rtol=1e-6)
    exact = torch.nn.functional.linear(x, w, b)
    assert float((y - exact).norm() / exact.norm()) < 0.06  # W8A8 is a few percent off fp32


def test_quantize_into_existing_storage() -> None:
    t = fp8.quantize(torch.randn(4, 16))
    ptr = t.data.data_ptr()
    fp8.quantize(torch.randn(4, 16), out=t)
    assert t.data.data_ptr() == ptr
    with pytest.raises(ValueError, match="out has"):
        fp8.quantize(torch.randn(4, 32), out=t)


@pytest.mark.parametrize("per_row", [True, False])
def test_scaled_mm_path_matches_emulation(per_row: bool) -> None:
    # torch ships a CPU `_scaled_mm` for FP8: this checks the GPU path's call conventions (operand layout,
    # scale shapes, row padding) here, where only the bf16 output rounding separates it from emulation.
    torch.manual_seed(0)
    w = fp8.quantize(torch.randn(48, 64), per_row=per_row)
    x, b = torch.randn(2, 5, 64), torch.randn(48)  # 10 token rows: padded to 16 inside
    try:
        got = fp8.linear_scaled_mm(x, w, b)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch build has no CPU _scaled_mm: {exc}")
    ref = fp8.linear_emulated(x, w, b)
    assert got.shape == ref.shape == (2, 5, 48)
    assert float((got - ref).norm() / ref.norm()) < 1e-2
