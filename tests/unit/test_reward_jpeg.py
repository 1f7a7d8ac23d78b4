"""DDPO's JPEG rewards: the size of a quality-95 JPEG in kB, signed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rewards.base import make_scorer


def _kb(image: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_sizes_match_pil_and_signs_are_opposite() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    images[0] = 128  # flat: compresses well
    comp = make_scorer("jpeg_compressibility").score(images, ["a"] * 3)
    incomp = make_scorer("jpeg_incompressibility").score(images, ["a"] * 3)
    expected = np.array([_kb(x) for x in images], dtype=np.float32)
    np.testing.assert_allclose(incomp.scores["jpeg_incompressibility"], expected, rtol=1e-6)
    np.testing.assert_allclose(comp.scores["jpeg_compressibility"], -expected, rtol=1e-6)
    assert comp.scores["jpeg_compressibility"].argmax() == 0 and comp.ok.all()


def test_video_scores_the_mean_frame_and_quality_is_a_version() -> None:
    clips = np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    scorer = make_scorer("jpeg_incompressibility", quality="50", device="cuda:0")  # CLI passes strings
    got = scorer.score(clips, ["a", "b"]).scores["jpeg_incompressibility"]
    np.testing.assert_allclose(got, [np.mean([_kb(f, 50) for f in clip]) for clip in clips], rtol=1e-6)
    assert scorer.info().version == "ddpo-q50" and scorer.info().accepts_video


def test_bad_input_is_refused() -> None:
    scorer = make_scorer("jpeg_compressibility")
    with pytest.raises(ValueError, match="expected uint8"):
        scorer.score(np.zeros((1, 8, 8, 3), np.float32), ["a"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        scorer.score(np.zeros((1, 8, 8, 3), np.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="quality"):
        make_scorer("jpeg_compressibility", quality=0)
