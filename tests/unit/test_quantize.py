"""Rollout copies: QuantLinear accuracy, skip rules and report, allocation-free re-quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.fp8 import FP8Tensor
from kernels.nvfp4 import NVFP4Tensor
from kernels.quantize import QuantConfig, QuantLinear, quantize_policy, requantize_


class _Block(nn.Module):
    """Linears named as in Sana's blocks (attn.qkv/proj, cross_attn.*, mlp.inverted_conv/point_conv)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d, bias=False), "proj": nn.Linear(d, d)})
        self.cross_attn = nn.ModuleDict(
            {"q_linear": nn.Linear(d, d), "kv_linear": nn.Linear(d, 2 * d), "proj": nn.Linear(d, d)}
        )
        self.mlp = nn.ModuleDict(
            {"inverted_conv": nn.Linear(d, 5 * d), "point_conv": nn.Linear(5 * d // 2, d, bias=False)}
        )
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * (1 + self.scale_shift_table[0]) + self.scale_shift_table[1]
        q, k, v = self.attn["qkv"](h).chunk(3, dim=-1)
        x = x + self.attn["proj"](torch.relu(q) * v.tanh() + k.sigmoid())
        c = self.cross_attn["kv_linear"](x).chunk(2, dim=-1)[0] * self.cross_attn["q_linear"](x).sigmoid()
        x = x + self.cross_attn["proj"](c)
        a, g = self.mlp["inverted_conv"](self.norm(x)).chunk(2, dim=-1)
        return x + self.mlp["point_conv"](a * nn.functional.silu(g))


class ToySana(nn.Module):
    """A small stack with Sana's module names, for tests that must not depend on policy/sana.py."""

    def __init__(self, d: int = 64, depth: int = 2, cin: int = 16) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(cin, d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([_Block(d) for _ in range(depth)])
        self.final_layer = nn.ModuleDict({"linear": nn.Linear(d, cin)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x)
        h = h + self.t_block(h)[..., : h.shape[-1]]
        for block in self.blocks:
            h = block(h)
        return self.final_layer["linear"](h)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize(("fmt", "tol"), [("fp8", 0.06), ("nvfp4", 0.2), ("w4a16", 0.15)])
def test_quant_linear_close_to_fp32_linear(fmt: str, tol: float) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    nn.init.normal_(lin.bias, std=0.1)
    q = QuantLinear.from_linear(lin, fmt)  # type: ignore[arg-type]
    x = torch.randn(4, 7, 256)
    y, ref = q(x), lin(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = _rel(y, ref)
    assert 1e-4 < err < tol  # quantized (not a silent fp32 fallback) yet faithful
    assert isinstance(q.quant_weight(), FP8Tensor if fmt == "fp8" else NVFP4Tensor)


def test_w4a4_is_less_accurate_than_weight_only() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    errs = {fmt: _rel(QuantLinear.from_linear(lin, fmt)(x), lin(x)) for fmt in ("nvfp4", "w4a16", "fp8")}
    assert errs["fp8"] < errs["w4a16"] < errs["nvfp4"]


def test_module_dtype_cast_leaves_scales_alone() -> None:
    q = QuantLinear.from_linear(nn.Linear(64, 32), "nvfp4")
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    q.to(torch.bfloat16)
    assert q.bias is not None and q.bias.dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items() if k != "bias")


def test_skip_rules_and_report() -> None:
    torch.manual_seed(0)
    model = ToySana(d=64)
    qmodel, report = quantize_policy(model, QuantConfig(fmt="nvfp4", min_dim=128))
    by_name = {d.name: d for d in report.layers}
    assert len(by_name) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert "skip pattern 'x_embedder'" in by_name["x_embedder"].reason
    assert "t_block" in by_name["t_block.1"].reason
    assert "final_layer" in by_name["final_layer.linear"].reason
    assert r"\.attn\.qkv$" in by_name["blocks.0.attn.qkv"].reason
    assert "max(in, out) = 64 <= min_dim 128" in by_name["blocks.1.attn.proj"].reason
    assert "max(in, out) = 128 <= min_dim 128" in by_name["blocks.1.cross_attn.kv_linear"].reason  # inclusive
    replaced = {d.name for d in report.replaced}
    assert replaced == {f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("inverted_conv", "point_conv")}
    assert all(isinstance(qmodel.get_submodule(n), QuantLinear) for n in replaced)
    assert isinstance(qmodel.get_submodule("blocks.0.cross_attn.kv_linear"), nn.Linear)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # the source is untouched
    assert "4 Linears replaced" in report.summary()


def test_nvfp4_weight_bytes_are_four_and_a_half_bits() -> None:
    model = ToySana(d=128, depth=1)
    _, report = quantize_policy(model, QuantConfig(fmt="nvfp4", skip_patterns=[], min_dim=0))
    assert len(report.skipped) == 0
    got, bf16 = report.weight_bytes()
    n_tensors = len(report.replaced)
    numel = bf16 // 2
    assert got == pytest.approx(numel * 4.5 / 8 + 4 * n_tensors)  # codes + E4M3 block scales + FP32 scale
    assert report.bits_per_element() == pytest.approx(4.5, abs=0.01)
    assert got / bf16 < 0.3
    fp8_got, _ = quantize_policy(model, QuantConfig(fmt="fp8", skip_patterns=[], min_dim=0))[1].weight_bytes()
    assert fp8_got / bf16 == pytest.approx(0.5, abs=0.02)


def test_bf16_copy_replaces_nothing_and_rounds_weights() -> None:
    torch.manual_seed(0)
    model = ToySana()
    qmodel, report = quantize_policy(model, QuantConfig(fmt="bf16"))
    assert not report.replaced and all(d.reason == "fmt is bf16" for d in report.layers)
    w = model.get_parameter("blocks.0.attn.proj.weight")
    wq = qmodel.get_parameter("blocks.0.attn.proj.weight")
    assert wq.dtype == torch.float32 and wq.data_ptr() != w.data_ptr()
    assert torch.equal(wq, w.to(torch.bfloat16).float()) and not torch.equal(wq, w)
    x = torch.randn(2, 5, 16)
    assert 0 < _rel(qmodel(x), model(x)) < 1e-2


def test_quantized_copy_runs_and_is_close() -> None:
    torch.manual_seed(0)
    model = ToySana()
    x = torch.randn(2, 9, 16)
    ref = model(x)
    errs = {}
    for fmt in ("fp8", "w4a16", "nvfp4"):
        qmodel, _ = quantize_policy(model, QuantConfig(fmt=fmt, min_dim=0))  # type: ignore[arg-type]
        errs[fmt] = _rel(qmodel(x), ref)
    assert 0 < errs["fp8"] < errs["w4a16"] < errs["nvfp4"] < 0.3


def test_requantize_is_allocation_free_and_equals_fresh_quantization() -> None:
    torch.manual_seed(0)
    model = ToySana()
    qmodel, _ = quantize_policy(model, QuantConfig(fmt="nvfp4", min_dim=0))
    storage = [t.data_ptr() for t in (*qmodel.parameters(), *qmodel.buffers())]
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        requantize_(qmodel, model.state_dict())
        assert [t.data_ptr() for t in (*qmodel.parameters(), *qmodel.buffers())] == storage
        fresh, _ = quantize_policy(model, QuantConfig(fmt="nvfp4", min_dim=0))
        a, b = qmodel.state_dict(), fresh.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_requantize_names_bad_keys_and_writes_nothing() -> None:
    model = ToySana()
    qmodel, _ = quantize_policy(model, QuantConfig(fmt="fp8", min_dim=0))
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    sd = {k: v + 1 for k, v in model.state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.point_conv.weight"}
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.point_conv\.weight"):
        requantize_(qmodel, missing)
    with pytest.raises(ValueError, match=r"extra\.key"):
        requantize_(qmodel, {**sd, "extra.key": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight has shape \(3, 3\)"):
        requantize_(qmodel, {**sd, "final_layer.linear.weight": torch.zeros(3, 3)})
    # Every check runs before the first write: a rejected state dict leaves the copy as it was.
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())


def test_bad_skip_pattern_is_named() -> None:
    with pytest.raises(ValueError, match=r"skip_patterns\[1\]"):
        quantize_policy(ToySana(), QuantConfig(skip_patterns=["ok", "bad("]))
