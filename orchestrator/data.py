"""Parquet data sources: prompts for RL, (image, caption) pairs for SFT / pretraining, preference pairs
for offline DPO, and the recipe's `data:` section that makes them. How they walk, shard, shuffle and
resume is shared (orchestrator/parquet_source.py). Bad rows (empty prompt, broken image) raise DataError
naming the file and row, or with `on_bad_row="skip"` are skipped and counted in `bad_rows`.

Example:
    prompts = PromptSource("prompts.parquet", rank=0, world=2, seed=0)
    prompts.next_batch(8).prompts   # 8 strings; later epochs reshuffle
    ckpt = prompts.state()          # JSON-ready ints; PromptSource(...).load_state(ckpt) resumes
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import numpy as np

from orchestrator.parquet_source import BadRow, DataError, OnBadRow, ParquetSource, ReadArgs
from orchestrator.schema import ConfigError


@dataclass(kw_only=True, slots=True)
class PromptBatch:
    prompts: list[str]  # [B]


@dataclass(kw_only=True, slots=True)
class ImageCaptionBatch:
    images: np.ndarray  # uint8 [B, H, W, 3]
    captions: list[str]  # [B]


@dataclass(kw_only=True, slots=True)
class PreferenceBatch:
    prompts: list[str]  # [B]
    preferred: np.ndarray  # uint8 [B, H, W, 3]
    rejected: np.ndarray  # uint8 [B, H, W, 3]


def _text(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"{column}: empty or missing text ({value!r})")
    return value


def _image(row: dict[str, Any], column: str, size: int | None) -> np.ndarray:
    """uint8 [H, W, 3] from PNG/JPEG bytes (or a datasets-style {'bytes': ...} struct); center-cropped
    and resized to size x size when size is set."""
    from PIL import Image

    value = row[column]
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes) or not value:
        raise BadRow(f"{column}: no image bytes")
    try:
        with Image.open(io.BytesIO(value)) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRow(f"{column}: cannot decode image ({exc})") from None
    if size is not None and image.size != (size, size):
        w, h = image.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(image, dtype=np.uint8)


def _stack(images: list[np.ndarray], what: str) -> np.ndarray:
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{what}: images of different sizes in one batch; set a size to resize them")
    return np.stack(images)


class PromptSource(ParquetSource[str]):
    """Prompts for RL. `column` None picks 'prompt' when the file has it, else 'caption'."""

    def __init__(self, path: str | Path, column: str | None = None, **read: Unpack[ReadArgs]) -> None:
        if column is None:
            import pyarrow.parquet as pq

            root = Path(path)
            first = min(root.glob("*.parquet"), default=root) if root.is_dir() else root
            try:
                names = pq.read_schema(first).names
            except Exception:  # the base class reports a missing or unreadable file
                names = []
            column = "caption" if "prompt" not in names and "caption" in names else "prompt"
        self.column = column
        super().__init__(path, [column], **read)

    def _convert(self, row: dict[str, Any]) -> str:
        return _text(row, self.column)

    def next_batch(self, n: int) -> PromptBatch:
        return PromptBatch(prompts=self._take(n))


class ImageCaptionSource(ParquetSource[tuple[np.ndarray, str]]):
    """(image, caption) pairs for SFT and pretraining; images decoded to uint8 [size, size, 3]."""

    def __init__(
        self,
        path: str | Path,
        image_column: str = "image",
        caption_column: str = "caption",
        size: int | None = None,
        **read: Unpack[ReadArgs],
    ) -> None:
        self.image_column, self.caption_column, self.size = image_column, caption_column, size
        super().__init__(path, [image_column, caption_column], **read)

    def _convert(self, row: dict[str, Any]) -> tuple[np.ndarray, str]:
        return _image(row, self.image_column, self.size), _text(row, self.caption_column)

    def next_batch(self, n: int) -> ImageCaptionBatch:
        pairs = self._take(n)
        return ImageCaptionBatch(
            images=_stack([p[0] for p in pairs], str(self.files[0])), captions=[p[1] for p in pairs]
        )


class PreferenceSource(ParquetSource[tuple[str, np.ndarray, np.ndarray]]):
    """Offline DPO pairs from a Pick-a-Pic-like layout: caption, jpg_0, jpg_1, label_0 (1.0: image 0
    preferred, 0.0: image 1, 0.5: tie). Ties are skipped and counted in `ties`."""

    def __init__(
        self,
        path: str | Path,
        size: int | None = None,
        *,
        caption_column: str = "caption",
        image_columns: tuple[str, str] = ("jpg_0", "jpg_1"),
        label_column: str = "label_0",
        **read: Unpack[ReadArgs],
    ) -> None:
        self.size, self.caption_column = size, caption_column
        self.image_columns, self.label_column = image_columns, label_column
        super().__init__(path, [caption_column, *image_columns, label_column], **read)

    @property
    def ties(self) -> int:
        return self.filtered

    def _convert(self, row: dict[str, Any]) -> tuple[str, np.ndarray, np.ndarray] | None:
        label = row[self.label_column]
        if label not in (0.0, 0.5, 1.0):  # also rejects None and NaN
            raise BadRow(f"{self.label_column}: expected 0, 0.5 or 1, got {label!r}")
        if label == 0.5:
            return None
        caption = _text(row, self.caption_column)
        first, second = (_image(row, c, self.size) for c in self.image_columns)
        return (caption, first, second) if label == 1.0 else (caption, second, first)

    def next_batch(self, n: int) -> PreferenceBatch:
        triples = self._take(n)
        where = str(self.files[0])
        return PreferenceBatch(
            prompts=[t[0] for t in triples],
            preferred=_stack([t[1] for t in triples], where),
            rejected=_stack([t[2] for t in triples], where),
        )


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """The recipe's `data:` section: which files feed the run and how they are read."""

    prompts: str | None = None
    """Parquet file or directory of RL training prompts."""
    prompt_column: str | None = None
    """Column holding the prompts; None: 'prompt' if present, else 'caption'."""
    dataset: str | None = None
    """Parquet file or directory of (image, caption) records for sft and pretrain."""
    image_column: str = "image"
    """Column of encoded image bytes (PNG/JPEG) in `dataset`."""
    caption_column: str = "caption"
    """Column of captions in `dataset` and `preferences`."""
    preferences: str | None = None
    """Parquet of preference pairs for offline DPO (caption, jpg_0, jpg_1, label_0)."""
    eval_prompts: str | None = None
    """Parquet of the fixed evaluation prompts, read whole in file order."""
    on_bad_row: OnBadRow = "error"
    """error: stop at a bad row (empty prompt, broken image) naming file and row; skip: count and go on."""
    shuffle: bool = True
    """Shuffle row-group order and rows within windows, per epoch, from `seed`."""
    seed: int = 0
    """Seed of the shuffling (with the epoch number)."""
    window_rows: int = field(default=1024, metadata={"ge": 1})
    """Rows read at a time; the shuffle mixes rows within a window, memory holds one window."""

    def paths(self) -> dict[str, str | None]:
        """The file fields by name: prompts, dataset, preferences, eval_prompts."""
        return {name: getattr(self, name) for name in ("prompts", "dataset", "preferences", "eval_prompts")}

    def resolve(self, base_dir: str | Path) -> DataConfig:
        """Take relative paths relative to `base_dir` (the recipe's folder), in place; returns self."""
        for name, value in self.paths().items():
            if value is not None:
                path = Path(value).expanduser()
                setattr(self, name, str(path if path.is_absolute() else Path(base_dir) / path))
        return self

    def _path(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"data.{name}: this mode needs it, but it is not set")
        return str(value)

    def read_args(self, rank: int = 0, world: int = 1) -> ReadArgs:
        """How this run's sources read, for one rank."""
        return ReadArgs(
            rank=rank,
            world=world,
            shuffle=self.shuffle,
            seed=self.seed,
            on_bad_row=self.on_bad_row,
            window_rows=self.window_rows,
        )

    def prompt_source(self, rank: int = 0, world: int = 1) -> PromptSource:
        return PromptSource(self._path("prompts"), self.prompt_column, **self.read_args(rank, world))

    def dataset_source(self, size: int | None, rank: int = 0, world: int = 1) -> ImageCaptionSource:
        """(image, caption) records, images resized to size x size (None: as stored)."""
        return ImageCaptionSource(
            self._path("dataset"), self.image_column, self.caption_column, size, **self.read_args(rank, world)
        )

    def preference_source(self, size: int | None, rank: int = 0, world: int = 1) -> PreferenceSource:
        return PreferenceSource(
            self._path("preferences"), size, caption_column=self.caption_column, **self.read_args(rank, world)
        )

    def read_eval_prompts(self) -> list[str]:
        """All evaluation prompts in file order (bad rows raise: an eval set must be clean)."""
        return PromptSource(self._path("eval_prompts"), self.prompt_column, shuffle=False).read_epoch()


__all__ = [
    "DataConfig",
    "DataError",
    "ImageCaptionBatch",
    "ImageCaptionSource",
    "PreferenceBatch",
    "PreferenceSource",
    "PromptBatch",
    "PromptSource",
    "ReadArgs",
]
