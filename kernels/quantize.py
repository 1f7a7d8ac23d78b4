"""Quantized rollout copies of the policy (DESIGN.md section 6): `quantize_policy` and `requantize_`.

The generator keeps the full-precision policy and, per low-precision format, a deep copy in which the
selected `nn.Linear`s are `QuantLinear`s holding packed weights. After every weight sync it calls
`requantize_`, which rewrites those buffers in place: no new parameter or buffer storage, so CUDA graphs
and caches that captured the buffers stay valid.

What is not quantized stays in BF16 (Sol-RL): kept Linears, norms, tables and biases of the copy hold
BF16-rounded values, stored in the source model's dtype. On CPU (float32 models) the copy therefore runs
with the same float32 inputs as the policy while carrying BF16 weight numerics; a bf16 model stays bf16.
fmt "bf16" is exactly that copy with no replacement.

    qmodel, report = quantize_policy(model, QuantConfig(fmt="nvfp4"))
    print(report.summary())
    requantize_(qmodel, new_state_dict)   # after a weight sync
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from kernels import dispatch, fp8, nvfp4
from kernels.fp8 import FP8Tensor
from kernels.nvfp4 import NVFP4Tensor

Format = Literal["bf16", "fp8", "nvfp4", "w4a16"]


@dataclass(kw_only=True, slots=True)
class QuantConfig:
    """Which Linears of the rollout copy are quantized, and how."""

    fmt: Format = "nvfp4"
    skip_patterns: list[str] = field(
        default_factory=lambda: [
            "x_embedder",
            "t_embedder",
            "t_block",
            "caption_projection",
            "final_layer",
            r"\.attn\.qkv$",
        ]
    )
    """Module-name regexes left in BF16 (embedders, final layer, attention qkv: Sol-RL's choice)."""
    min_dim: int = field(default=2240, metadata={"ge": 0})
    """Linears with max(in, out) <= min_dim stay in BF16."""

    def validate(self) -> None:
        for i, pattern in enumerate(self.skip_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"skip_patterns[{i}]: invalid regex {pattern!r}: {exc}") from exc


class QuantLinear(nn.Module):
    """A Linear whose weight lives in NVFP4 (fmt nvfp4 / w4a16) or FP8 E4M3 (fmt fp8) buffers.

    Scales and FP8 data are stored as integer bit patterns and viewed as float8/float32 at use:
    `module.to(torch.bfloat16)` casts every floating buffer, which would silently re-round the scales.
    The forward runs whatever `kernels.dispatch.pick(fmt, x.device)` chooses.
    """

    # fmt fp8: data_bits uint8 [out, in] (E4M3 bits), scale_bits int32 [out, 1] (float32 bits per row).
    # fmt nvfp4 / w4a16: packed uint8 [out, in // 2], block_scale_bits uint8 [out, in // 16] (E4M3 bits),
    # tensor_scale_bits int32 [] (float32 bits).
    data_bits: torch.Tensor
    scale_bits: torch.Tensor
    packed: torch.Tensor
    block_scale_bits: torch.Tensor
    tensor_scale_bits: torch.Tensor
    bias: torch.Tensor | None  # [out] in the source bias dtype, BF16-rounded

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        fmt: Format,
        bias: bool,
        device: torch.device | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if fmt not in ("nvfp4", "w4a16", "fp8"):
            raise ValueError(f"QuantLinear: fmt must be nvfp4, w4a16 or fp8, got {fmt!r}")
        if in_features % nvfp4.BLOCK or out_features % nvfp4.BLOCK:
            raise ValueError(f"QuantLinear: {out_features}x{in_features} is not a multiple of 16 both ways")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt

        def zeros(*shape: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        if fmt == "fp8":
            self.register_buffer("data_bits", zeros(out_features, in_features))
            self.register_buffer("scale_bits", zeros(out_features, 1, dtype=torch.int32))
        else:
            self.register_buffer("packed", zeros(out_features, in_features // 2))
            self.register_buffer("block_scale_bits", zeros(out_features, in_features // nvfp4.BLOCK))
            self.register_buffer("tensor_scale_bits", zeros(dtype=torch.int32))
        self.register_buffer("bias", zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Format) -> QuantLinear:
        """A QuantLinear holding `linear`'s weight quantized and its bias BF16-rounded, on its device."""
        has_bias = linear.bias is not None
        q = cls(
            linear.in_features,
            linear.out_features,
            fmt=fmt,
            bias=has_bias,
            device=linear.weight.device,
            bias_dtype=linear.bias.dtype if has_bias else torch.float32,
        )
        q.load_(linear.weight, linear.bias)
        return q

    def quant_weight(self) -> NVFP4Tensor | FP8Tensor:
        """Typed views of the buffers (sharing their storage)."""
        if self.fmt == "fp8":
            return FP8Tensor(
                data=self.data_bits.view(torch.float8_e4m3fn), scale=self.scale_bits.view(torch.float32)
            )
        return NVFP4Tensor(
            packed=self.packed,
            block_scales=self.block_scale_bits.view(torch.float8_e4m3fn),
            tensor_scale=self.tensor_scale_bits.view(torch.float32),
            shape=(self.out_features, self.in_features),
        )

    @torch.no_grad()
    def load_(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantize `weight` [out, in] into the existing buffers; copy a BF16-rounded `bias` [out] if given."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"QuantLinear.load_: weight {tuple(weight.shape)} != {(self.out_features, self.in_features)}"
            )
        target = self.quant_weight()
        w = weight.detach().to(next(self.buffers()).device)
        if isinstance(target, FP8Tensor):
            fp8.quantize(w, per_row=True, out=target)
        else:
            nvfp4.quantize(w, out=target)
        if bias is not None:
            if self.bias is None:
                raise ValueError("QuantLinear.load_: got a bias for a layer built without one")
            self.bias.copy_(bias.to(torch.bfloat16))

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight storage (packed values and all scales; bias excluded)."""
        return self.quant_weight().nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.linear(self.fmt, x, self.quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


@dataclass(kw_only=True, slots=True)
class LayerDecision:
    name: str
    in_features: int
    out_features: int
    replaced: bool
    reason: str
    """'quantized to nvfp4', or why the layer stayed in BF16."""
    bytes: int
    """Weight bytes in the rollout copy (BF16 = 2 bytes an element when kept)."""


@dataclass(kw_only=True, slots=True)
class QuantReport:
    """What `quantize_policy` replaced and skipped, and the Linear weight bytes against all-BF16."""

    fmt: Format
    layers: list[LayerDecision]

    @property
    def replaced(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.replaced]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.replaced]

    def weight_bytes(self, *, replaced_only: bool = False) -> tuple[int, int]:
        """(bytes in the rollout copy, bytes in BF16) over all Linear weights, or the replaced ones only."""
        rows = self.replaced if replaced_only else self.layers
        return sum(d.bytes for d in rows), sum(2 * d.in_features * d.out_features for d in rows)

    def bits_per_element(self) -> float:
        """Storage bits per weight element over the replaced layers (NVFP4: 4.5 plus 32 per tensor)."""
        got, bf16 = self.weight_bytes(replaced_only=True)
        return 16.0 * got / bf16 if bf16 else 16.0

    def summary(self) -> str:
        got, bf16 = self.weight_bytes()
        lines = [
            f"{self.fmt}: {len(self.replaced)} Linears replaced, {len(self.skipped)} kept in BF16; "
            f"Linear weights {got / 2**20:.2f} MiB vs {bf16 / 2**20:.2f} MiB BF16 ({got / max(bf16, 1):.3f}x)"
        ]
        lines += [
            f"  {'Q' if d.replaced else '-'} {d.name} [{d.out_features}x{d.in_features}]: {d.reason}"
            for d in self.layers
        ]
        return "\n".join(lines)


def _decide(name: str, linear: nn.Linear, cfg: QuantConfig) -> str | None:
    """None to quantize, else the reason the layer stays in BF16."""
    if cfg.fmt == "bf16":
        return "fmt is bf16"
    for pattern in cfg.skip_patterns:
        if re.search(pattern, name):
            return f"name matches skip pattern '{pattern}'"
    if max(linear.in_features, linear.out_features) <= cfg.min_dim:
        return f"max(in, out) = {max(linear.in_features, linear.out_features)} <= min_dim {cfg.min_dim}"
    if linear.in_features % nvfp4.BLOCK or linear.out_features % nvfp4.BLOCK:
        return "in or out features not a multiple of 16"
    return None


@torch.no_grad()
def _round_to_bf16_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.is_floating_point():
            p.copy_(p.to(torch.bfloat16))


def quantize_policy(model: nn.Module, cfg: QuantConfig) -> tuple[nn.Module, QuantReport]:
    """A deep-copied rollout copy of `model` with the selected Linears replaced, and the report.

    The source model is not modified. Names are matched with `re.search` against module names such as
    `blocks.3.attn.qkv`.
    """
    cfg.validate()
    qmodel = copy.deepcopy(model).eval().requires_grad_(False)  # rollout copies never train
    layers = []
    for name, module in list(qmodel.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        why = _decide(name, module, cfg)
        if why is None:
            q = QuantLinear.from_linear(module, cfg.fmt)
            parent_name, _, child = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name), child, q)
            nbytes, reason = q.weight_bytes(), f"quantized to {cfg.fmt}"
        else:
            nbytes, reason = 2 * module.weight.numel(), why
        layers.append(
            LayerDecision(
                name=name,
                in_features=module.in_features,
                out_features=module.out_features,
                replaced=why is None,
                reason=reason,
                bytes=nbytes,
            )
        )
    # After the replacement: quantized weights come from full precision, as in requantize_.
    _round_to_bf16_(qmodel)
    return qmodel, QuantReport(fmt=cfg.fmt, layers=layers)


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(local name, tensor, is_parameter) of a module's own parameters and persistent buffers."""
    own: list[tuple[str, torch.Tensor, bool]] = [
        (n, p, True) for n, p in module.named_parameters(recurse=False)
    ]
    own += [
        (n, b, False)
        for n, b in module.named_buffers(recurse=False)
        if n not in module._non_persistent_buffers_set
    ]
    return own


@torch.no_grad()
def requantize_(qmodel: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refresh a rollout copy in place from a full-precision state dict of the source model.

    QuantLinears re-quantize into their buffers; every other parameter is copied BF16-rounded (as in
    `quantize_policy`) and every persistent buffer exactly, into existing storage. Keys and shapes must
    match the source model's `state_dict()`; they are all checked before anything is written, and a
    missing, unexpected or mis-shaped key raises ValueError naming it.
    """
    expected: dict[str, tuple[int, ...]] = {}
    for name, module in qmodel.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, QuantLinear):
            expected[prefix + "weight"] = (module.out_features, module.in_features)
            if module.bias is not None:
                expected[prefix + "bias"] = (module.out_features,)
        else:
            expected.update({prefix + n: tuple(t.shape) for n, t, _ in _own_tensors(module)})
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    for what, keys in (("state dict lacks", missing), ("keys not in the rollout copy", unexpected)):
        if keys:
            raise ValueError(f"requantize_: {what}: {keys[:5]}{' ...' if len(keys) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(
                f"requantize_: {key} has shape {tuple(state_dict[key].shape)}, the copy needs {shape}"
            )

    for name, module in qmodel.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, QuantLinear):
            module.load_(state_dict[prefix + "weight"], state_dict.get(prefix + "bias"))
            continue
        for local, dst, is_param in _own_tensors(module):
            src = state_dict[prefix + local]
            dst.copy_(src.to(torch.bfloat16) if is_param and dst.is_floating_point() else src)
