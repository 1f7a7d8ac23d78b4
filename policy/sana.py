"""Sana DiT: configuration and network (DESIGN.md section 2; Sana arXiv 2410.10629).

Module names follow the original Sana code (x_embedder, t_block, blocks.{i}.attn.qkv, ...); the mapping to
diffusers' `SanaTransformer2DModel` keys lives in `policy/state_dict_adapter.py`. Every Linear that the
low-precision rollout copy may swap is a plain `nn.Linear` (the 1x1 convs of Mix-FFN included).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Preset = Literal["tiny", "0.6B", "1.6B", "4.8B"]


@dataclass(kw_only=True, slots=True)
class SanaConfig:
    """Architecture of one Sana DiT. Names follow diffusers' `SanaTransformer2DModel` where they map."""

    in_channels: int = 32
    """Latent channels (32 for DC-AE f32c32, 3 for the pixel codec)."""
    out_channels: int = 32
    hidden_size: int = 2240
    depth: int = 20
    head_dim: int = 32
    """Self-attention head dim; heads = hidden_size // head_dim."""
    cross_heads: int = 20
    caption_channels: int = 2304
    """Width of the text encoder's hidden states (Gemma-2-2B: 2304)."""
    mlp_ratio: float = 2.5
    patch_size: int = 1
    qk_norm: bool = False
    """RMSNorm on q and k (SANA 1.5)."""
    sample_size: int = 32
    """Latent side the checkpoint was trained at (diffusers config field; informational)."""
    norm_eps: float = 1e-6
    y_norm_scale_factor: float = 0.01
    """Initial weight of the caption RMSNorm (Sana's text-to-image configs: 0.01, so text enters the
    blocks gently). Initialisation only: loaded weights replace it, and checkpoints do not record it."""

    @staticmethod
    def preset(name: Preset) -> SanaConfig:
        return dataclasses.replace(PRESETS[name])


PRESETS: dict[str, SanaConfig] = {
    # Trains on a 2-core CPU: pixel-space shapes world with the MiniLM text encoder (384 channels).
    "tiny": SanaConfig(
        in_channels=3, out_channels=3, hidden_size=128, depth=4, cross_heads=4,
        caption_channels=384, patch_size=2, sample_size=32,
    ),
    "0.6B": SanaConfig(hidden_size=1152, depth=28, cross_heads=16),
    "1.6B": SanaConfig(hidden_size=2240, depth=20, cross_heads=20),
    "4.8B": SanaConfig(hidden_size=2240, depth=60, cross_heads=20, qk_norm=True),
}  # fmt: skip


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which policy to build: a preset, optional per-field overrides, optional local weights."""

    preset: Preset = "tiny"
    pretrained: str | None = None
    """Local diffusers-layout directory or original Sana .pth; never a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    overrides: dict[str, int | float | bool] = field(default_factory=dict)
    """Fields of SanaConfig to change from the preset, e.g. {depth: 2}."""

    def arch(self) -> SanaConfig:
        cfg = SanaConfig.preset(self.preset)
        for key, value in self.overrides.items():
            setattr(cfg, key, type(getattr(cfg, key))(value))
        return cfg

    def validate(self) -> None:
        names = {f.name for f in dataclasses.fields(SanaConfig)}
        for key in self.overrides:
            if key not in names:
                raise ValueError(
                    f"overrides.{key}: not a SanaConfig field (known: {', '.join(sorted(names))})"
                )


def _check(cond: bool, name: str, message: Callable[[], str]) -> None:
    """The message is built only on failure: under torch.compile, formatting a symbolic batch size into a
    string would specialise the graph to that size, and every other batch size would compile again."""
    if not cond:
        raise ValueError(f"{name}: {message()}")


class RMSNorm(nn.Module):
    """RMSNorm computed as diffusers does: statistics in fp32, weight applied in the weight's dtype."""

    def __init__(self, dim: int, eps: float, init: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(self.weight.dtype) * self.weight


class PatchEmbed(nn.Module):
    """p x p patches to tokens; a Linear over (C, p, p) patches equals diffusers' stride-p Conv2d."""

    def __init__(self, in_channels: int, patch_size: int, hidden: int) -> None:
        super().__init__()
        self.p = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, hidden)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, N, D]
        b, c, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(x.reshape(b, (h // p) * (w // p), c * p * p))


class TimestepEmbedder(nn.Module):
    """Sinusoidal (cos, sin) features of the 0..1000 timestep, then Linear-SiLU-Linear (PixArt/Sana)."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:  # float [B] -> [B, D]
        half = self.freq_dim // 2
        # Computed on the fly (not a buffer) so that casting the model to bf16 keeps these in fp32.
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(next(self.mlp.parameters()).dtype))


class CaptionProjection(nn.Module):
    """Text encoder width -> D -> D with GELU-tanh (PixArt's y_proj)."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class LinearAttention(nn.Module):
    """ReLU linear self-attention: O = relu(Q)(relu(K)^T V) / (relu(Q) sum_j relu(K_j)^T), O(N) in tokens."""

    def __init__(self, dim: int, head_dim: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        # SANA 1.5 normalises q and k across all heads (diffusers: "rms_norm_across_heads").
        self.q_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.k_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D]
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # fp32 accumulation: the sum over N tokens overflows / loses precision in bf16 and fp16.
        q = F.relu(q).float().view(b, n, self.heads, -1).transpose(1, 2)  # [B, h, N, d]
        kt = F.relu(k).float().view(b, n, self.heads, -1).permute(0, 2, 3, 1)  # [B, h, d, N]
        # A ones column appended to V yields the normaliser sum_j relu(K_j) in the same two matmuls.
        v = F.pad(v.float().view(b, n, self.heads, -1).transpose(1, 2), (0, 1), value=1.0)  # [B, h, N, d+1]
        out = q @ (kt @ v)  # [B, h, N, d+1]
        out = out[..., :-1] / (out[..., -1:] + 1e-15)
        out = self.proj(out.transpose(1, 2).reshape(b, n, d).to(x.dtype))
        return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


class CrossAttention(nn.Module):
    """Softmax multi-head attention from image tokens to text tokens; padding enters as an additive bias."""

    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.k_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None

    def forward(self, x: Tensor, y: Tensor, bias: Tensor) -> Tensor:  # [B, N, D], [B, L, D], [B, 1, 1, L]
        b, n, d = x.shape
        q = self.q_linear(x)
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU autocast would run attention in bf16, whose backward there is 8x slower than float32's
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class GLUMBConv(nn.Module):
    """Mix-FFN: D -> 2h (+SiLU), depthwise 3x3 on 2h, GLU split x * SiLU(gate), h -> D."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.inverted_conv = nn.Linear(dim, 2 * hidden)
        self.depth_conv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point_conv = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:  # [B, N, D]
        b, n, _ = x.shape
        x = F.silu(self.inverted_conv(x))
        # Tokens are already channels-last; the permuted view feeds the conv without a copy.
        x = self.depth_conv(x.view(b, size[0], size[1], -1).permute(0, 3, 1, 2))
        x, gate = x.permute(0, 2, 3, 1).reshape(b, n, -1).chunk(2, dim=-1)
        return self.point_conv(x * F.silu(gate))


class SanaBlock(nn.Module):
    """One adaLN-single block: linear self-attention, cross-attention, Mix-FFN (DESIGN.md section 2)."""

    def __init__(self, cfg: SanaConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = LinearAttention(d, cfg.head_dim, cfg.qk_norm)
        self.cross_attn = CrossAttention(d, cfg.cross_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = GLUMBConv(d, int(cfg.mlp_ratio * d))
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(self, x: Tensor, t6: Tensor, y: Tensor, y_bias: Tensor, size: tuple[int, int]) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.cross_attn(x, y, y_bias)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp, size)


class FinalLayer(nn.Module):
    """LayerNorm modulated by the (2, D) table plus the timestep embedding, then tokens -> patches."""

    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class SanaDiT(nn.Module):
    """The Sana diffusion transformer; predicts the flow velocity v = noise - x0.

    Example:
        model = SanaDiT(SanaConfig.preset("tiny"))
        v = model(x, sigma * 1000, text, text_mask)  # x [B, 3, 32, 32], text [B, L, 384], mask bool [B, L]
    """

    def __init__(self, cfg: SanaConfig) -> None:
        super().__init__()
        _check(
            cfg.hidden_size % cfg.head_dim == 0,
            "hidden_size",
            lambda: f"{cfg.hidden_size} not a multiple of head_dim",
        )
        _check(
            cfg.hidden_size % cfg.cross_heads == 0,
            "cross_heads",
            lambda: f"{cfg.cross_heads} does not divide hidden_size",
        )
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.in_channels, p, d)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.caption_projection = CaptionProjection(cfg.caption_channels, d)
        self.caption_norm = RMSNorm(d, eps=1e-5, init=cfg.y_norm_scale_factor)
        self.blocks = nn.ModuleList([SanaBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, p * p * cfg.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # PixArt/Sana init: xavier Linears, zero biases, zero output layer (the model starts at v = 0).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in (self.t_embedder.mlp, self.t_block):  # small init keeps early modulation near identity
            for linear in module.modules():
                if isinstance(linear, nn.Linear):
                    nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)

    def forward(self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """x [B, C, H, W], timestep [B] (sigma * 1000), text [B, L, Dc], text_mask bool [B, L] -> velocity like x."""
        self._check_inputs(x, timestep, text, text_mask)
        b, _, height, width = x.shape
        p, d = self.cfg.patch_size, self.cfg.hidden_size
        h, w = height // p, width // p
        dtype = self.x_embedder.proj.weight.dtype  # the compute dtype, also under FSDP2 mixed precision
        tokens = self.x_embedder(x.to(dtype))
        t = self.t_embedder(timestep.expand(b) if timestep.ndim == 0 else timestep)
        t6 = self.t_block(t).view(b, 6, d)
        y = self.caption_norm(self.caption_projection(text.to(dtype)))
        # Additive -1e4 (as diffusers) rather than -inf: a fully padded row stays finite.
        y_bias = torch.zeros(b, 1, 1, text.shape[1], dtype=dtype, device=x.device)
        y_bias = y_bias.masked_fill(~text_mask[:, None, None, :], -10000.0)
        for block in self.blocks:
            tokens = block(tokens, t6, y, y_bias, (h, w))
        out = self.final_layer(tokens, t).view(b, h, w, p, p, -1)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, height, width).to(x.dtype)

    def _check_inputs(self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor) -> None:
        cfg = self.cfg
        _check(
            x.ndim == 4 and x.shape[1] == cfg.in_channels,
            "x",
            lambda: f"expected [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}",
        )
        _check(x.is_floating_point(), "x", lambda: f"expected a float tensor, got {x.dtype}")
        p = cfg.patch_size
        _check(
            x.shape[2] % p == 0 and x.shape[3] % p == 0,
            "x",
            lambda: f"H, W {tuple(x.shape[2:])} not multiples of patch size {p}",
        )
        b = x.shape[0]
        _check(
            timestep.ndim == 0 or tuple(timestep.shape) == (b,),
            "timestep",
            lambda: f"expected [{b}], got {tuple(timestep.shape)}",
        )
        _check(
            text.ndim == 3 and text.shape[0] == b and text.shape[2] == cfg.caption_channels,
            "text",
            lambda: f"expected [{b}, L, {cfg.caption_channels}], got {tuple(text.shape)}",
        )
        _check(
            tuple(text_mask.shape) == tuple(text.shape[:2]),
            "text_mask",
            lambda: f"expected {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}",
        )
        _check(
            text_mask.dtype == torch.bool,
            "text_mask",
            lambda: f"expected dtype torch.bool, got {text_mask.dtype}",
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, config: SanaConfig | None = None
    ) -> SanaDiT:
        """Load a diffusers-layout directory (config.json + safetensors, sharded or not; a pipeline root with
        `transformer/` works too) or an original Sana `.pth` (architecture from `config`, else inferred).
        A missing or unexpected key or a shape mismatch raises ValueError naming the key."""
        from policy import state_dict_adapter as sda

        path = Path(path)
        if path.is_dir():
            cfg, ours = sda.load_diffusers_dir(path)
            if config is not None:
                sda.check_same_arch(config, cfg, str(path))
        elif path.suffix in (".pth", ".pt", ".bin") and path.is_file():
            theirs = sda.load_original_file(path)
            cfg = config if config is not None else sda.infer_original_config(theirs)
            ours = sda.import_state_dict(theirs, cfg, "original", str(path))
        else:
            raise ValueError(
                f"pretrained: {path} is neither a diffusers directory nor an original Sana .pth file"
            )
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, strict=True, assign=True)
        return model.to(dtype)

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 10 * 2**30) -> None:
        """Write config.json + diffusion_pytorch_model*.safetensors that diffusers'
        `SanaTransformer2DModel.from_pretrained` (and so `SanaPipeline`) loads."""
        from policy import state_dict_adapter as sda

        sda.save_diffusers_dir(self.cfg, self.state_dict(), Path(directory), max_shard_bytes)


def build_policy(cfg: ModelConfig) -> SanaDiT:
    """The policy a recipe describes: preset + overrides, local weights when `pretrained` is set, cast to dtype."""
    cfg.validate()
    dtype = getattr(torch, cfg.dtype)
    if cfg.pretrained:
        return SanaDiT.from_pretrained(cfg.pretrained, dtype=dtype, config=cfg.arch())
    return SanaDiT(cfg.arch()).to(dtype)
