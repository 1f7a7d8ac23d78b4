"""physics: optical flow on synthetic motion, temporal consistency of clips, and the VLM question set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewards.base import make_scorer
from rewards.models import vlm
from rewards.models.physics import PHYSICS_QUESTIONS, lucas_kanade, warp


def square_clip(
    frames: int = 8, size: int = 64, step: tuple[int, int] = (3, 2), side: int = 14
) -> np.ndarray:
    """uint8 [T, size, size, 3]: a red square moving `step` pixels a frame over a dark background."""
    clip = np.full((frames, size, size, 3), 40, dtype=np.uint8)
    for t in range(frames):
        x, y = 8 + step[0] * t, 10 + step[1] * t
        clip[t, y : y + side, x : x + side] = (220, 60, 60)
    return clip


def _sample(texture: torch.Tensor, x0: float, y0: float, size: int) -> torch.Tensor:
    """texture [1, 1, S, S] read bilinearly at (x0 + x, y0 + y) for x, y in 0..size-1."""
    s = texture.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size) + y0, torch.arange(size) + x0, indexing="ij")
    grid = torch.stack([2 * xs / (s - 1) - 1, 2 * ys / (s - 1) - 1], dim=-1)[None].float()
    return F.grid_sample(texture, grid, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("shift", [(2.0, -1.0), (0.5, 1.5), (-5.0, 3.0)])
def test_lucas_kanade_recovers_a_translation(shift: tuple[float, float]) -> None:
    g = torch.Generator().manual_seed(0)
    texture = F.interpolate(torch.rand(1, 1, 24, 24, generator=g), size=(128, 128), mode="bicubic")
    a = _sample(texture, 20.0, 20.0, 64)
    b = _sample(texture, 20.0 - shift[0], 20.0 - shift[1], 64)  # a(x) = b(x + shift)
    flow = lucas_kanade(a, b)
    centre = flow[0, :, 16:48, 16:48].flatten(1).median(dim=1).values
    torch.testing.assert_close(centre, torch.tensor(shift), atol=0.15, rtol=0.0)
    warped, _ = warp(b, flow)
    centre_err = (warped - a).abs()[..., 16:48, 16:48].mean()
    assert centre_err < 0.3 * (b - a).abs()[..., 16:48, 16:48].mean(), (
        "warping undoes most of the difference (bilinear resampling blurs the rest)"
    )


def test_moving_square_is_more_consistent_than_shuffled() -> None:
    scorer = make_scorer("physics")
    clip = square_clip()
    shuffled = clip[[0, 5, 2, 7, 1, 6, 3, 4]]
    static = np.repeat(clip[:1], 8, axis=0)
    noise = np.random.default_rng(1).integers(0, 256, clip.shape, dtype=np.uint8)
    batch = scorer.score(np.stack([clip, shuffled, static, noise]), [""] * 4)
    s = batch.scores["physics"]
    assert s.shape == (4,) and s.dtype == np.float32 and batch.ok.all()
    assert s[2] == pytest.approx(1.0, abs=1e-6), "a still clip is perfectly consistent"
    assert s[2] >= s[0] > s[1] > s[3]
    assert s[0] > 0.95 and s[1] < 0.9
    np.testing.assert_allclose(s, np.exp(-batch.extras["warp_error"] / 0.05), rtol=1e-5)
    np.testing.assert_array_equal(
        s, scorer.score(np.stack([clip, shuffled, static, noise]), [""] * 4).scores["physics"]
    )
    info = scorer.info()
    assert info.accepts_video and info.heads == ["physics"]


def test_large_frames_are_downscaled_for_the_flow() -> None:
    clip = square_clip(frames=6, size=192, step=(9, 6), side=42)
    scorer = make_scorer("physics", flow_size="64")
    s = scorer.score(np.stack([clip, clip[[0, 4, 1, 5, 2, 3]]]), ["", ""]).scores["physics"]
    assert s[0] > s[1]


def test_misuse_is_a_clear_error() -> None:
    scorer = make_scorer("physics")
    with pytest.raises(ValueError, match="still images are judged by a VLM"):
        scorer.score(square_clip()[:2], ["", ""])
    with pytest.raises(ValueError, match="at least 2 frames"):
        scorer.score(square_clip()[None, :1], [""])
    with pytest.raises(ValueError, match="need weights"):
        make_scorer("physics", backend="vllm")
    with pytest.raises(ValueError, match="temporal_weight"):
        make_scorer("physics", temporal_weight=2)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(vlm.random_checkpoint("vlm", tmp_path_factory.mktemp("physics-vlm"))["weights"])


def test_vlm_question_set_on_images_and_sampled_frames(judge_dir: Path) -> None:
    scorer = make_scorer("physics", weights=str(judge_dir), temporal_weight=0.25, vlm_frames=3)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    still = scorer.score(images, ["a cat", "a dog"])
    assert still.ok.all() and set(still.extras) == set(PHYSICS_QUESTIONS)
    per_q = np.stack([still.extras[q] for q in PHYSICS_QUESTIONS], axis=1)
    np.testing.assert_allclose(still.scores["physics"], per_q.mean(axis=1), rtol=1e-6)
    assert np.all((per_q >= 0) & (per_q <= 1))

    clips = np.stack([square_clip(size=40, step=(2, 1), side=10)] * 2)
    clips[1] = clips[1][[0, 6, 3, 7, 1, 5, 2, 4]]
    video = scorer.score(clips, ["", ""])
    assert video.ok.all() and {"temporal_consistency", "warp_error", *PHYSICS_QUESTIONS} == set(video.extras)
    vlm_part = np.stack([video.extras[q] for q in PHYSICS_QUESTIONS], axis=1).mean(axis=1)
    expected = 0.25 * video.extras["temporal_consistency"] + 0.75 * vlm_part
    np.testing.assert_allclose(video.scores["physics"], expected, rtol=1e-5)
    # The sampled frames 0, 4, 7 of each clip are what the judge sees: asking it directly agrees.
    values, _ = scorer.judge.ask(clips[:, [0, 4, 7]].reshape(-1, 40, 40, 3), [""] * 6)  # type: ignore[attr-defined]
    np.testing.assert_allclose(vlm_part, values.reshape(2, 3, -1).mean(axis=(1, 2)), rtol=1e-5)
