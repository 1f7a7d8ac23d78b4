"""Map SanaDiT state dicts to and from diffusers' `SanaTransformer2DModel` and the original Sana `.pth`.

One table (`key_map`) lists, for every parameter of our model, the key(s) it has in each layout and how
the tensor changes: `copy`; `concat` (our fused qkv / kv Linear is the dim-0 concatenation of diffusers'
to_q/to_k/to_v); `conv` (our Linear is a Conv2d weight flattened: 1x1 convs of Mix-FFN, the p x p patch
embedding). Loading is strict: a missing or unexpected key or a wrong shape raises ValueError naming it.

Example:
    theirs = export_state_dict(model.state_dict(), model.cfg, "diffusers")
    model.load_state_dict(import_state_dict(theirs, model.cfg, "diffusers"))
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from policy.sana import PRESETS, SanaConfig

Layout = Literal["diffusers", "original"]

# Keys of the original checkpoint that carry no weights of the network we run: the fixed sin-cos position
# table (Sana 512/1024 px do not use it), the learned null caption used for CFG dropout, and the
# log-variance head some training runs attach.
_ORIGINAL_IGNORED = ("pos_embed", "y_embedder.y_embedding", "logvar_linear.weight", "logvar_linear.bias")


@dataclass(frozen=True, slots=True)
class KeyMap:
    """One parameter of ours and its name(s) in the diffusers and original layouts."""

    ours: str
    diffusers: tuple[str, ...]
    original: tuple[str, ...]
    kind: Literal["copy", "concat", "conv"] = "copy"
    kernel: int = 1
    """conv only: the spatial kernel of their Conv2d weight (1, or the patch size)."""


def key_map(cfg: SanaConfig) -> list[KeyMap]:
    """Every parameter of `SanaDiT(cfg)` with its names in the two foreign layouts."""
    km: list[KeyMap] = []

    def add(ours: str, diff: str | tuple[str, ...], orig: str | None = None, **kw: Any) -> None:
        diff_t = (diff,) if isinstance(diff, str) else diff
        km.append(KeyMap(ours, diff_t, (orig or ours,), **kw))

    for wb in ("weight", "bias"):
        add(f"x_embedder.proj.{wb}", f"patch_embed.proj.{wb}", kind="conv" if wb == "weight" else "copy",
            kernel=cfg.patch_size)  # fmt: skip
        add(f"t_embedder.mlp.0.{wb}", f"time_embed.emb.timestep_embedder.linear_1.{wb}")
        add(f"t_embedder.mlp.2.{wb}", f"time_embed.emb.timestep_embedder.linear_2.{wb}")
        add(f"t_block.1.{wb}", f"time_embed.linear.{wb}")
        add(
            f"caption_projection.fc1.{wb}", f"caption_projection.linear_1.{wb}", f"y_embedder.y_proj.fc1.{wb}"
        )
        add(
            f"caption_projection.fc2.{wb}", f"caption_projection.linear_2.{wb}", f"y_embedder.y_proj.fc2.{wb}"
        )
        add(f"final_layer.linear.{wb}", f"proj_out.{wb}")
    add("caption_norm.weight", "caption_norm.weight", "attention_y_norm.weight")
    add("final_layer.scale_shift_table", "scale_shift_table")
    for i in range(cfg.depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        add(f"{o}.scale_shift_table", f"{d}.scale_shift_table")
        add(f"{o}.attn.qkv.weight", tuple(f"{d}.attn1.to_{x}.weight" for x in "qkv"), kind="concat")
        for wb in ("weight", "bias"):
            add(f"{o}.attn.proj.{wb}", f"{d}.attn1.to_out.0.{wb}")
            add(f"{o}.cross_attn.q_linear.{wb}", f"{d}.attn2.to_q.{wb}")
            add(
                f"{o}.cross_attn.kv_linear.{wb}",
                (f"{d}.attn2.to_k.{wb}", f"{d}.attn2.to_v.{wb}"),
                kind="concat",
            )
            add(f"{o}.cross_attn.proj.{wb}", f"{d}.attn2.to_out.0.{wb}")
            add(f"{o}.mlp.depth_conv.{wb}", f"{d}.ff.conv_depth.{wb}", f"{o}.mlp.depth_conv.conv.{wb}")
        add(f"{o}.mlp.inverted_conv.weight", f"{d}.ff.conv_inverted.weight", f"{o}.mlp.inverted_conv.conv.weight",
            kind="conv")  # fmt: skip
        add(f"{o}.mlp.inverted_conv.bias", f"{d}.ff.conv_inverted.bias", f"{o}.mlp.inverted_conv.conv.bias")
        add(
            f"{o}.mlp.point_conv.weight",
            f"{d}.ff.conv_point.weight",
            f"{o}.mlp.point_conv.conv.weight",
            kind="conv",
        )
        if cfg.qk_norm:
            for mod, dmod in (("attn", "attn1"), ("cross_attn", "attn2")):
                add(f"{o}.{mod}.q_norm.weight", f"{d}.{dmod}.norm_q.weight")
                add(f"{o}.{mod}.k_norm.weight", f"{d}.{dmod}.norm_k.weight")
    return km


def _theirs(entry: KeyMap, layout: Layout) -> tuple[str, ...]:
    return entry.diffusers if layout == "diffusers" else entry.original


def export_state_dict(ours: Mapping[str, Tensor], cfg: SanaConfig, layout: Layout) -> dict[str, Tensor]:
    """Our state dict -> `layout`'s keys and shapes."""
    out: dict[str, Tensor] = {}
    for e in key_map(cfg):
        t, names = ours[e.ours], _theirs(e, layout)
        if e.kind == "concat":
            out.update(zip(names, t.chunk(len(names), dim=0), strict=True))
        elif e.kind == "conv":
            out[names[0]] = t.reshape(t.shape[0], -1, e.kernel, e.kernel)
        else:
            out[names[0]] = t
    return out


def import_state_dict(
    theirs: Mapping[str, Tensor], cfg: SanaConfig, layout: Layout, source: str = ""
) -> dict[str, Tensor]:
    """`layout`'s state dict -> ours; strict about keys and shapes (errors name their key)."""
    expected = _expected_shapes(cfg)
    where = f" in {source}" if source else ""
    ignored = _ORIGINAL_IGNORED if layout == "original" else ()
    entries = key_map(cfg)
    known = {name for e in entries for name in _theirs(e, layout)}
    for name in theirs:
        if name not in known and name not in ignored:
            raise ValueError(
                f"unexpected key {name!r}{where} (not part of a {layout} Sana model with {_arch(cfg)})"
            )
    out: dict[str, Tensor] = {}
    for e in entries:
        names = _theirs(e, layout)
        shape = expected[e.ours]
        for name in names:
            if name not in theirs:
                raise ValueError(f"missing key {name!r}{where} (needed for {e.ours}; model has {_arch(cfg)})")
        if e.kind == "concat":
            part = (shape[0] // len(names), *shape[1:])
            for name in names:
                _check_shape(name, theirs[name], part, where)
            out[e.ours] = torch.cat([theirs[n] for n in names], dim=0)
        elif e.kind == "conv":
            k = e.kernel
            _check_shape(names[0], theirs[names[0]], (shape[0], shape[1] // (k * k), k, k), where)
            out[e.ours] = theirs[names[0]].reshape(shape)
        else:
            _check_shape(names[0], theirs[names[0]], shape, where)
            out[e.ours] = theirs[names[0]]
    return out


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...], where: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"shape mismatch for {name!r}{where}: checkpoint has {tuple(t.shape)}, model expects {shape}"
        )


def _arch(cfg: SanaConfig) -> str:
    return f"depth={cfg.depth}, hidden_size={cfg.hidden_size}, qk_norm={cfg.qk_norm}"


def _expected_shapes(cfg: SanaConfig) -> dict[str, tuple[int, ...]]:
    from policy.sana import SanaDiT

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SanaDiT(cfg).state_dict().items()}


# ---------------------------------------------------------------------------------------------- configs

# diffusers config fields we do not implement, with the only value we accept.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "attention_bias": False,
    "norm_elementwise_affine": False,
    "interpolation_scale": None,  # Sana 2K/4K add a sin-cos position embedding
    "guidance_embeds": False,  # Sana-Sprint
    "timestep_scale": 1.0,  # Sana-Sprint
}


def config_to_diffusers(cfg: SanaConfig) -> dict[str, Any]:
    """The `config.json` diffusers' `SanaTransformer2DModel` reads for this architecture."""
    from importlib.metadata import PackageNotFoundError, version

    try:  # informational only: a machine without diffusers still writes a folder diffusers can load
        stamp = {"_diffusers_version": version("diffusers")}
    except PackageNotFoundError:
        stamp = {}
    d = cfg.hidden_size
    return {
        "_class_name": "SanaTransformer2DModel",
        **stamp,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_attention_heads": d // cfg.head_dim,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.depth,
        "num_cross_attention_heads": cfg.cross_heads,
        "cross_attention_head_dim": d // cfg.cross_heads,
        "cross_attention_dim": d,
        "caption_channels": cfg.caption_channels,
        "mlp_ratio": cfg.mlp_ratio,
        "dropout": 0.0,
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "norm_eps": cfg.norm_eps,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "guidance_embeds_scale": 0.1,
        **_DIFFUSERS_FIXED,
    }


def config_from_diffusers(c: Mapping[str, Any], source: str = "config.json") -> SanaConfig:
    """Our SanaConfig from a diffusers `config.json`; refuses variants this network does not implement."""
    for key, value in _DIFFUSERS_FIXED.items():
        if c.get(key, value) != value:
            raise ValueError(f"{source}: {key}={c[key]!r} is not supported (only {value!r})")
    qk = c.get("qk_norm")
    if qk not in (None, "rms_norm_across_heads"):
        raise ValueError(f"{source}: qk_norm={qk!r} is not supported (None or 'rms_norm_across_heads')")
    heads, head_dim = int(c.get("num_attention_heads", 70)), int(c.get("attention_head_dim", 32))
    hidden = heads * head_dim
    if int(c.get("cross_attention_dim") or hidden) != hidden:
        raise ValueError(f"{source}: cross_attention_dim={c['cross_attention_dim']} must equal {hidden}")
    cross_heads = int(c.get("num_cross_attention_heads", 20))
    if int(c.get("cross_attention_head_dim", hidden // cross_heads)) * cross_heads != hidden:
        raise ValueError(
            f"{source}: cross_attention_head_dim * num_cross_attention_heads must equal {hidden}"
        )
    in_ch = int(c.get("in_channels", 32))
    return SanaConfig(
        in_channels=in_ch,
        out_channels=int(c.get("out_channels") or in_ch),
        hidden_size=hidden,
        depth=int(c.get("num_layers", 20)),
        head_dim=head_dim,
        cross_heads=cross_heads,
        caption_channels=int(c.get("caption_channels", 2304)),
        mlp_ratio=float(c.get("mlp_ratio", 2.5)),
        patch_size=int(c.get("patch_size", 1)),
        qk_norm=qk is not None,
        sample_size=int(c.get("sample_size", 32)),
        norm_eps=float(c.get("norm_eps", 1e-6)),
    )


def infer_original_config(sd: Mapping[str, Tensor]) -> SanaConfig:
    """Architecture from an original checkpoint's shapes. Head counts are not in the shapes: head_dim is
    Sana's 32 and cross_heads comes from the published preset with the same width (else pass a config)."""
    for key in ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight"):
        if key not in sd:
            raise ValueError(f"missing key {key!r}: not an original Sana checkpoint")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    presets = [c for c in PRESETS.values() if c.hidden_size == hidden]
    if not presets:
        raise ValueError(
            f"hidden_size {hidden} matches no published Sana size: pass config= to from_pretrained"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    sample = 32
    if "pos_embed" in sd:  # [1, (sample/p)^2, D]
        sample = round(sd["pos_embed"].shape[1] ** 0.5) * p
    return SanaConfig(
        in_channels=in_ch,
        out_channels=sd["final_layer.linear.weight"].shape[0] // (p * p),
        hidden_size=hidden,
        depth=depth,
        cross_heads=presets[0].cross_heads,
        caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
        mlp_ratio=sd["blocks.0.mlp.inverted_conv.conv.weight"].shape[0] / 2 / hidden,
        patch_size=p,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        sample_size=sample,
    )


def check_same_arch(wanted: SanaConfig, found: SanaConfig, source: str) -> None:
    """The recipe's preset/overrides must describe the checkpoint they load (sample_size is informational,
    y_norm_scale_factor only initialises)."""
    for f in fields(SanaConfig):
        a, b = getattr(wanted, f.name), getattr(found, f.name)
        if f.name not in ("sample_size", "y_norm_scale_factor") and a != b:
            raise ValueError(
                f"model.{f.name}: the recipe says {a!r} but {source} has {b!r} (fix preset/overrides)"
            )


# ---------------------------------------------------------------------------------------------- files


def load_original_file(path: Path) -> dict[str, Tensor]:
    """The tensors of an original Sana `.pth` (`{"state_dict": ...}` or a bare state dict)."""
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    prefix = "model.diffusion_model."  # some trainers save the wrapped module
    return {k.removeprefix(prefix): v for k, v in sd.items() if isinstance(v, Tensor)}


def load_diffusers_dir(path: Path) -> tuple[SanaConfig, dict[str, Tensor]]:
    """Config and our state dict from a diffusers transformer directory (or a pipeline root)."""
    from safetensors.torch import load_file

    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"pretrained: {cfg_file} not found")
    cfg = config_from_diffusers(json.loads(cfg_file.read_text()), str(cfg_file))
    theirs: dict[str, Tensor] = {}
    for shard in _weight_files(path):
        theirs.update(load_file(shard))
    return cfg, import_state_dict(theirs, cfg, "diffusers", str(path))


def _weight_files(path: Path) -> Iterator[Path]:
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        yield from (path / name for name in sorted(set(weight_map.values())))
        return
    single = path / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise ValueError(f"pretrained: {path} has neither {single.name} nor {index.name}")
    yield single


def save_diffusers_dir(cfg: SanaConfig, ours: Mapping[str, Tensor], path: Path, max_shard_bytes: int) -> None:
    """Write the diffusers layout: config.json and one or more safetensors shards (with an index)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    theirs = {k: _full(v).contiguous() for k, v in export_state_dict(ours, cfg, "diffusers").items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in theirs.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    (path / "config.json").write_text(json.dumps(config_to_diffusers(cfg), indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in theirs.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _full(t: Tensor) -> Tensor:
    # FSDP2 parameters are DTensors: gather the full tensor (a collective: every rank must call this).
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach().cpu()
