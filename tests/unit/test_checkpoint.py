"""Checkpoint folders: atomic completion, latest_complete, pruning; LoRA merging for snapshots and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from policy.checkpoint import COMPLETE, atomic_dir, export_diffusers, latest_complete, prune
from policy.lora import LoRAConfig, apply_lora, merge_lora
from policy.sana import SanaConfig, SanaDiT


def _write(path: Path) -> None:
    with atomic_dir(path) as tmp:
        (tmp / "shard.bin").write_bytes(b"x" * 16)


def test_half_written_checkpoints_are_never_latest(tmp_path: Path) -> None:
    assert latest_complete(tmp_path) is None
    _write(tmp_path / "step-0000001")
    _write(tmp_path / "step-0000002")
    assert (tmp_path / "step-0000002" / COMPLETE).is_file()
    # a crash mid-save: the temp folder exists (even with a marker inside), the final name does not
    with pytest.raises(RuntimeError, match="killed"), atomic_dir(tmp_path / "step-0000003") as tmp:
        (tmp / "shard.bin").write_bytes(b"partial")
        (tmp / COMPLETE).write_text("ok\n")
        raise RuntimeError("killed mid-save")
    assert (tmp_path / ".tmp-step-0000003").is_dir() and not (tmp_path / "step-0000003").exists()
    # a folder with the right name but no marker (copied by hand, or an older layout) is not complete
    (tmp_path / "step-0000004").mkdir()
    assert latest_complete(tmp_path) == tmp_path / "step-0000002"


def test_resave_replaces_and_prune_keeps_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _write(tmp_path / f"step-{step:07d}")
    with atomic_dir(tmp_path / "step-0000003") as tmp:
        (tmp / "new.bin").write_bytes(b"y")
    assert (tmp_path / "step-0000003" / "new.bin").is_file()
    assert not (tmp_path / "step-0000003" / "shard.bin").exists()
    (tmp_path / ".tmp-step-0000004").mkdir()
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [".tmp-step-0000004", "step-0000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002", "step-0000003"]


def _tiny() -> SanaConfig:
    cfg = SanaConfig.preset("tiny")
    cfg.depth = 2
    return cfg


def test_merged_lora_equals_the_adapted_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _tiny()
    base = SanaDiT(cfg)
    torch.nn.init.normal_(base.final_layer.linear.weight, std=0.02)
    lora = LoRAConfig(enabled=True, rank=4, alpha=8)
    adapted = apply_lora(base, lora)
    with torch.no_grad():  # B starts at zero; give it values so the merge has something to add
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    merged = merge_lora(adapted.state_dict(), lora.scale)
    plain = SanaDiT(cfg)
    plain.load_state_dict(merged, strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300.0, 800.0])
    text, mask = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, text, mask), adapted(x, t, text, mask), atol=1e-5, rtol=1e-4)
    # the export is a diffusers folder that loads back to the same weights
    out = export_diffusers(merged, cfg, tmp_path / "export")
    loaded = SanaDiT.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in merged.items())
    assert not (tmp_path / ".tmp-export").exists()


def test_lora_targets_must_match() -> None:
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        apply_lora(SanaDiT(_tiny()), LoRAConfig(enabled=True, target_modules=["no_such_layer"]))
