"""aesthetic: the LAION head files as published, on a tiny random CLIP, against an independent embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import make_scorer
from rewards.models import aesthetic
from rewards.models._preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_pixels

DIM = 16  # the tiny CLIP's projection width (768 for ViT-L/14)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(aesthetic.random_checkpoint("aesthetic", tmp_path_factory.mktemp("aes"))["clip"])


def _mlp_head(seed: int) -> dict[str, torch.Tensor]:
    """improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE.pth layout, input width DIM."""
    g = torch.Generator().manual_seed(seed)
    dims = {0: (1024, DIM), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for i, (out, inp) in dims.items():
        state[f"layers.{i}.weight"] = torch.randn(out, inp, generator=g) / inp**0.5
        state[f"layers.{i}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 48, 36, 3), dtype=np.uint8)


def _reference(clip_dir: Path, images: np.ndarray) -> torch.Tensor:
    """L2-normalised CLIP image features computed with transformers' own `get_image_features`."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=clip_pixels(images, 32, resample="pil"))
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return emb / emb.norm(dim=-1, keepdim=True)


def test_mlp_head_matches_published_computation(clip_dir: Path, tmp_path: Path) -> None:
    state = _mlp_head(0)
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = make_scorer(
        "aesthetic", weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip=str(clip_dir)
    )
    images = _images(5)
    batch = scorer.score(images, [""] * 5)
    assert batch.scores["aesthetic"].shape == (5,) and batch.ok.all()
    np.testing.assert_array_equal(
        batch.scores["aesthetic"], scorer.score(images, [""] * 5).scores["aesthetic"]
    )
    # The published head is linear layers only (no activations), dropout off in eval.
    x = _reference(clip_dir, images)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(batch.scores["aesthetic"], x.squeeze(-1).numpy(), rtol=1e-4, atol=1e-5)
    assert scorer.info().input_size == 32 and scorer.info().heads == ["aesthetic"]


def test_linear_head_layout(clip_dir: Path, tmp_path: Path) -> None:
    # LAION-AI/aesthetic-predictor's sa_0_4_vit_l_14_linear.pth: one Linear, keys weight / bias.
    w, b = torch.randn(1, DIM), torch.tensor([5.0])
    torch.save({"weight": w, "bias": b}, tmp_path / "sa_0_4_vit_l_14_linear.pth")
    scorer = make_scorer(
        "aesthetic", weights=str(tmp_path / "sa_0_4_vit_l_14_linear.pth"), clip=str(clip_dir)
    )
    images = _images(3)
    expected = (_reference(clip_dir, images) @ w.T + b).squeeze(-1).numpy()
    np.testing.assert_allclose(
        scorer.score(images, ["a"] * 3).scores["aesthetic"], expected, rtol=1e-4, atol=1e-5
    )


def test_wrong_head_files_are_named(clip_dir: Path, tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(1, DIM)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="neither the linear nor the MLP head"):
        make_scorer("aesthetic", weights=str(tmp_path / "odd.pth"), clip=str(clip_dir))
    state = _mlp_head(0)
    del state["layers.6.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"layers\.6\.bias"):
        make_scorer("aesthetic", weights=str(tmp_path / "partial.pth"), clip=str(clip_dir))
    torch.save({"weight": torch.zeros(1, DIM + 1), "bias": torch.zeros(1)}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="17-d embeddings"):
        make_scorer("aesthetic", weights=str(tmp_path / "wide.pth"), clip=str(clip_dir))


def test_clip_pixels_follows_torchvision_geometry() -> None:
    # 40 x 60 -> shortest side 32: 32 x 48, crop columns round((48 - 32) / 2) = 8 .. 40.
    img = np.zeros((1, 40, 60, 3), dtype=np.uint8)
    img[0, :, 30:] = 255  # right half white
    for resample in ("pil", "tensor"):
        px = clip_pixels(img, 32, resample=resample)  # type: ignore[arg-type]
        assert px.shape == (1, 3, 32, 32) and px.dtype == torch.float32
        row = px[0, 0, 16] * OPENAI_CLIP_STD[0] + OPENAI_CLIP_MEAN[0]
        # The edge sits at x = 24 of the resized image, i.e. column 16 of the crop.
        assert row[:14].max() < 0.05 and row[18:].min() > 0.95
    same = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expected = (
        torch.from_numpy(same).permute(0, 3, 1, 2) / 255.0 - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    ) / (torch.tensor(OPENAI_CLIP_STD)[:, None, None])
    torch.testing.assert_close(clip_pixels(same, 32, resample="pil"), expected.float())
