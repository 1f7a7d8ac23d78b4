"""DDPO's JPEG rewards: how many kilobytes an image takes as a quality-95 JPEG (Black et al., 2023,
arXiv 2305.13301, `ddpo_pytorch/rewards.py`).

`jpeg_incompressibility` is +size in kB (1 kB = 1000 bytes, as DDPO), `jpeg_compressibility` is -size:
training on the first adds detail and texture, on the second removes it. Both need no weights, run on a
CPU and respond to every pixel, which makes them the reward that CPU tests and the service benchmark
use. A clip ([N, T, H, W, 3]) scores the mean size of its frames.

Example:
    scorer = make_scorer("jpeg_compressibility")
    scorer.score(np.zeros((2, 64, 64, 3), np.uint8), ["", ""]).scores["jpeg_compressibility"]
    # array([-0.691, -0.691], dtype=float32): a flat image compresses to under a kilobyte
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from rewards.base import ScoreBatch, ScorerInfo, register


class JpegSize:
    """Signed JPEG size in kB per item; `sign` -1 rewards compressible images, +1 incompressible ones."""

    def __init__(self, name: str, sign: float, *, quality: int | str = 95, device: str = "cpu") -> None:
        # `device` is accepted so a launcher can pass it to every scorer alike; JPEG encoding is CPU work.
        quality = int(quality)  # the CLI's --scorer-arg values arrive as strings
        if not 1 <= quality <= 100:
            raise ValueError(f"{name}: quality must be in [1, 100], got {quality}")
        self.name = name
        self.sign = sign
        self.quality = quality

    def info(self) -> ScorerInfo:
        # The version names what the number means, so cached scores from another quality never mix.
        return ScorerInfo(
            name=self.name,
            version=f"ddpo-q{self.quality}",
            heads=[self.name],
            max_batch=64,
            accepts_video=True,
        )

    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        from PIL import Image

        if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: expected uint8 [N, H, W, 3] or [N, T, H, W, 3], "
                f"got {images.dtype} {images.shape}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        frames = images.reshape(-1, *images.shape[-3:])  # [N*T, H, W, 3]
        sizes = np.empty(len(frames), dtype=np.float64)
        buf = io.BytesIO()
        for i, frame in enumerate(frames):
            buf.seek(0)
            buf.truncate()
            Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
            sizes[i] = buf.tell() / 1000.0
        kb = sizes.reshape(images.shape[0], -1).mean(axis=1)
        return ScoreBatch(scores={self.name: (self.sign * kb).astype(np.float32)})


@register("jpeg_compressibility")
def jpeg_compressibility(**kwargs: Any) -> JpegSize:
    """Minus the quality-95 JPEG size in kB (DDPO): higher for simpler, smoother images."""
    return JpegSize("jpeg_compressibility", -1.0, **kwargs)


@register("jpeg_incompressibility")
def jpeg_incompressibility(**kwargs: Any) -> JpegSize:
    """The quality-95 JPEG size in kB (DDPO): higher for busier, more detailed images."""
    return JpegSize("jpeg_incompressibility", 1.0, **kwargs)
