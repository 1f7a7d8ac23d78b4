"""SanaDiT: parity with diffusers' SanaTransformer2DModel both ways, original .pth loading, strict keys, inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from policy import state_dict_adapter as sda
from policy.sana import ModelConfig, SanaConfig, SanaDiT, build_policy

# Two small architectures: patch 2 without qk-norm, patch 1 with SANA 1.5's qk-norm.
CONFIGS = {
    "plain": SanaConfig(in_channels=4, out_channels=4, hidden_size=64, depth=2, cross_heads=4,
                        caption_channels=24, patch_size=2, sample_size=8),
    "qknorm": SanaConfig(in_channels=3, out_channels=3, hidden_size=96, depth=2, cross_heads=2,
                         caption_channels=16, patch_size=1, qk_norm=True, sample_size=8),
}  # fmt: skip


def _inputs(cfg: SanaConfig, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, 8, 12, generator=g)  # non-square on purpose
    t = torch.tensor([900.0, 35.0])[:batch]
    text = torch.randn(batch, 5, cfg.caption_channels, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])[:batch]
    return x, t, text, mask


def _diffusers_model(cfg: SanaConfig) -> Any:
    from diffusers import SanaTransformer2DModel

    kwargs = {k: v for k, v in sda.config_to_diffusers(cfg).items() if not k.startswith("_")}
    model: Any = SanaTransformer2DModel(**kwargs)
    return model.eval()


def _randomize(model: torch.nn.Module) -> None:
    # Fresh models have zero / unit parameters (final layer, norms) that would hide mapping mistakes.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _diffusers_out(model: torch.nn.Module, x, t, text, mask) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(x, text, t, encoder_attention_mask=mask.long()).sample


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loads_diffusers_checkpoint_and_matches(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    ref = _diffusers_model(cfg)
    _randomize(ref)
    ref.save_pretrained(tmp_path)
    ours = SanaDiT.from_pretrained(tmp_path).eval()
    assert ours.cfg == cfg
    x, t, text, mask = _inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, text, mask)
    want = _diffusers_out(ref, x, t, text, mask)
    assert got.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_checkpoint_opens_in_diffusers_and_matches(name: str, tmp_path: Path) -> None:
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    cfg = CONFIGS[name]
    ours = SanaDiT(cfg).eval()
    _randomize(ours)
    # A tiny shard limit forces the sharded layout (index + several files), as large models get.
    ours.save_pretrained(tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ref = SanaTransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, text, mask = _inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, text, mask)
    assert (got - _diffusers_out(ref, x, t, text, mask)).abs().max().item() <= 1e-5
    again = SanaDiT.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_saves_without_diffusers_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU box or a slim image may lack diffusers: the export still writes and reloads, only the
    informational version stamp is left out of config.json."""
    import importlib.metadata

    assert "_diffusers_version" in sda.config_to_diffusers(CONFIGS["plain"])

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    ours = SanaDiT(CONFIGS["plain"]).eval()
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "SanaTransformer2DModel" and "_diffusers_version" not in config
    again = SanaDiT.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def _original_state_dict(cfg: SanaConfig) -> dict[str, torch.Tensor]:
    """Random weights under the original Sana key names and shapes, written out by hand (not via the adapter)."""
    d, c, p, dc = cfg.hidden_size, cfg.in_channels, cfg.patch_size, cfg.caption_channels
    h = int(cfg.mlp_ratio * d)
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "pos_embed": (1, (cfg.sample_size // p) ** 2, d),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "t_block.1.weight": (6 * d, d), "t_block.1.bias": (6 * d,),
        "y_embedder.y_embedding": (300, dc),
        "y_embedder.y_proj.fc1.weight": (d, dc), "y_embedder.y_proj.fc1.bias": (d,),
        "y_embedder.y_proj.fc2.weight": (d, d), "y_embedder.y_proj.fc2.bias": (d,),
        "attention_y_norm.weight": (d,),
        "final_layer.scale_shift_table": (2, d),
        "final_layer.linear.weight": (p * p * cfg.out_channels, d), "final_layer.linear.bias": (p * p * cfg.out_channels,),
    }  # fmt: skip
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        shapes |= {
            f"{b}.scale_shift_table": (6, d), f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
            f"{b}.cross_attn.q_linear.weight": (d, d), f"{b}.cross_attn.q_linear.bias": (d,),
            f"{b}.cross_attn.kv_linear.weight": (2 * d, d), f"{b}.cross_attn.kv_linear.bias": (2 * d,),
            f"{b}.cross_attn.proj.weight": (d, d), f"{b}.cross_attn.proj.bias": (d,),
            f"{b}.mlp.inverted_conv.conv.weight": (2 * h, d, 1, 1), f"{b}.mlp.inverted_conv.conv.bias": (2 * h,),
            f"{b}.mlp.depth_conv.conv.weight": (2 * h, 1, 3, 3), f"{b}.mlp.depth_conv.conv.bias": (2 * h,),
            f"{b}.mlp.point_conv.conv.weight": (d, h, 1, 1),
        }  # fmt: skip
        if cfg.qk_norm:
            for m in ("attn", "cross_attn"):
                shapes |= {f"{b}.{m}.q_norm.weight": (d,), f"{b}.{m}.k_norm.weight": (d,)}
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def test_loads_original_sana_pth_like_diffusers_converter(tmp_path: Path) -> None:
    from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers

    cfg = CONFIGS["plain"]
    original = _original_state_dict(cfg)
    torch.save({"state_dict": original}, tmp_path / "sana.pth")
    ours = SanaDiT.from_pretrained(tmp_path / "sana.pth", config=cfg).eval()
    # Oracle: diffusers' own converter for original Sana checkpoints.
    ref = _diffusers_model(cfg)
    ref.load_state_dict(convert_sana_transformer_to_diffusers(dict(original)), strict=True)
    x, t, text, mask = _inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, text, mask)
    assert (got - _diffusers_out(ref, x, t, text, mask)).abs().max().item() <= 1e-5


def test_original_config_inferred_from_shapes(tmp_path: Path) -> None:
    cfg = SanaConfig(in_channels=32, out_channels=32, hidden_size=1152, depth=1, cross_heads=16, qk_norm=True,
                     caption_channels=8, sample_size=16)  # fmt: skip
    original = _original_state_dict(cfg)
    torch.save(original, tmp_path / "bare.pth")
    model = SanaDiT.from_pretrained(tmp_path / "bare.pth")
    assert model.cfg == cfg  # cross_heads from the 0.6B preset of the same width, qk_norm from the keys
    key = "blocks.0.cross_attn.k_norm.weight"
    assert torch.equal(model.state_dict()[key], original[key])
    with pytest.raises(ValueError, match="matches no published Sana size"):
        sda.infer_original_config(_original_state_dict(CONFIGS["plain"]))


def test_key_and_shape_errors_name_the_key() -> None:
    cfg = CONFIGS["qknorm"]
    theirs = sda.export_state_dict(SanaDiT(cfg).state_dict(), cfg, "diffusers")
    missing = dict(theirs)
    del missing["transformer_blocks.1.attn1.norm_k.weight"]
    with pytest.raises(ValueError, match=r"missing key 'transformer_blocks\.1\.attn1\.norm_k\.weight'"):
        sda.import_state_dict(missing, cfg, "diffusers")
    extra = dict(theirs, **{"transformer_blocks.0.attn1.to_q.bias": torch.zeros(96)})
    with pytest.raises(ValueError, match=r"unexpected key 'transformer_blocks\.0\.attn1\.to_q\.bias'"):
        sda.import_state_dict(extra, cfg, "diffusers")
    wrong = dict(theirs, **{"transformer_blocks.0.ff.conv_point.weight": torch.zeros(96, 239, 1, 1)})
    with pytest.raises(
        ValueError, match=r"shape mismatch for 'transformer_blocks\.0\.ff\.conv_point\.weight'"
    ):
        sda.import_state_dict(wrong, cfg, "diffusers")


def test_unsupported_diffusers_variant_is_refused(tmp_path: Path) -> None:
    config = sda.config_to_diffusers(CONFIGS["plain"]) | {"interpolation_scale": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="interpolation_scale"):
        SanaDiT.from_pretrained(tmp_path)


def test_bad_inputs_raise_value_error_naming_the_argument() -> None:
    cfg = CONFIGS["plain"]
    model = SanaDiT(cfg)
    x, t, text, mask = _inputs(cfg)
    with pytest.raises(ValueError, match=r"^x:"):
        model(torch.randn(2, 3, 8, 12), t, text, mask)
    with pytest.raises(ValueError, match=r"^text:"):
        model(x, t, torch.randn(2, 5, 23), mask)
    with pytest.raises(ValueError, match=r"^text_mask:"):
        model(x, t, text, mask[:, :4])
    with pytest.raises(ValueError, match=r"^text_mask:.*bool"):
        model(x, t, text, mask.long())
    with pytest.raises(ValueError, match=r"^timestep:"):
        model(x, t[:1], text, mask)


def test_bf16_model_tracks_fp32() -> None:
    torch.manual_seed(0)
    cfg = CONFIGS["qknorm"]
    model = SanaDiT(cfg).eval()
    _randomize(model)
    x, t, text, mask = _inputs(cfg)
    with torch.no_grad():
        want = model(x, t, text, mask)
        got = model.to(torch.bfloat16)(x, t, text, mask)
    assert got.dtype == torch.float32  # velocity comes back in the caller's dtype
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 0.05


def test_build_policy_applies_overrides_and_checks_pretrained_arch(tmp_path: Path) -> None:
    model = build_policy(ModelConfig(preset="tiny", overrides={"depth": 1}, dtype="bfloat16"))
    assert len(model.blocks) == 1 and model.cfg.hidden_size == 128
    assert model.x_embedder.proj.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = build_policy(ModelConfig(preset="tiny", overrides={"depth": 1}, pretrained=str(tmp_path)))
    assert loaded.x_embedder.proj.weight.dtype == torch.float32
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key].float())
    with pytest.raises(ValueError, match=r"model\.depth"):
        build_policy(ModelConfig(preset="tiny", pretrained=str(tmp_path)))


def test_y_norm_scale_factor_only_initialises(tmp_path: Path) -> None:
    """It sets the caption RMSNorm's starting weight; a checkpoint's weights replace it on load, and a
    recipe that initialised differently still loads the checkpoint (it is not part of the architecture)."""
    gentle = build_policy(ModelConfig(preset="tiny", overrides={"depth": 1}))
    assert torch.all(gentle.caption_norm.weight == 0.01)  # Sana's text-to-image default
    full = {"depth": 1, "y_norm_scale_factor": 1.0}
    assert torch.all(build_policy(ModelConfig(preset="tiny", overrides=full)).caption_norm.weight == 1.0)
    with torch.no_grad():
        gentle.caption_norm.weight.uniform_(0.2, 0.4)  # trained weights, neither init value
    gentle.save_pretrained(tmp_path)
    # the checkpoint's config reads back 0.01; a recipe asking for 1.0 must still load it, weights from disk
    loaded = build_policy(ModelConfig(preset="tiny", overrides=full, pretrained=str(tmp_path)))
    assert torch.equal(loaded.caption_norm.weight, gentle.caption_norm.weight)
