"""Parquet data sources: prompts for RL, (image, caption) pairs for SFT / pretraining, preference pairs
for offline DPO. Streaming, sharded across ranks, shuffled deterministically, resumable to the record.

How a source walks its files (`path` is one parquet file or a directory of them, in name order):
- It reads windows of at most `window_rows` consecutive rows of one row group, as record batches, so
  memory holds one window of the needed columns, never a whole file.
- Epoch e visits the row groups in an order shuffled with (seed, e), and each window's rows in an
  order shuffled with (seed, e, row group, window); without `shuffle`, file order.
- Rank r of W takes every W-th record of that sequence starting at r: ranks are disjoint and together
  complete whatever the row-group layout (a one-row-group prompt file still splits). Each rank reads
  every window but decodes only its own rows.
- `state()` is (epoch, position in this rank's sequence, counters). `load_state` recomputes the order
  and seeks, so the record after a resume is exactly the one that would have come next.
Bad rows (empty prompt, broken image) raise DataError naming the file and row, or with
`on_bad_row="skip"` are skipped and counted in `bad_rows`.

Example:
    prompts = PromptSource("prompts.parquet", rank=0, world=2, seed=0)
    prompts.next_batch(8).prompts   # 8 strings; later epochs reshuffle
    ckpt = prompts.state()          # JSON-ready ints; PromptSource(...).load_state(ckpt) resumes
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar, Unpack

import numpy as np

from orchestrator.schema import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")
OnBadRow = Literal["error", "skip"]


class ReadArgs(TypedDict, total=False):
    """How a source reads: its shard, shuffling and bad-row policy (see the module docstring)."""

    rank: int
    world: int
    shuffle: bool
    seed: int
    on_bad_row: OnBadRow
    window_rows: int


class DataError(ValueError):
    """A data file or row that cannot be used; the message starts with the file (and row)."""


class _BadRow(Exception):
    """Raised by a source's row conversion; becomes a DataError or a skipped-and-counted row."""


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


@dataclass(frozen=True, slots=True)
class _RowGroup:
    file: int
    index: int
    first_row: int
    """Index in its file of the row group's first row (for error messages)."""
    rows: int


class _Source(Generic[T]):
    """The walking, sharding and resuming every source shares; subclasses convert rows to records."""

    def __init__(
        self,
        path: str | Path,
        columns: list[str],
        *,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        on_bad_row: OnBadRow = "error",
        window_rows: int = 1024,
    ) -> None:
        import pyarrow.parquet as pq

        if not 0 <= rank < world or window_rows < 1 or on_bad_row not in ("error", "skip"):
            raise ValueError(
                f"{path}: need 0 <= rank < world, window_rows >= 1, on_bad_row error|skip; got "
                f"rank={rank}, world={world}, window_rows={window_rows}, on_bad_row={on_bad_row!r}"
            )
        self.path = root = Path(path)
        self.files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
        if not root.exists() or not self.files:
            raise DataError(f"{path}: no such parquet file or directory of parquet files")
        self.columns, self.rank, self.world = columns, rank, world
        self.shuffle, self.seed, self.on_bad_row, self.window_rows = shuffle, seed, on_bad_row, window_rows
        self.groups: list[_RowGroup] = []
        for f, file in enumerate(self.files):
            try:
                opened = pq.ParquetFile(file)
            except Exception as exc:  # pyarrow raises several types for a file that is not parquet
                raise DataError(f"{file}: not a readable parquet file ({exc})") from None
            meta, names = opened.metadata, opened.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"{file}: missing column {missing[0]!r} (columns: {', '.join(names)})")
            first = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    self.groups.append(_RowGroup(f, g, first, rows))
                first += rows
        self.total = sum(g.rows for g in self.groups)
        if self.total < world:
            raise DataError(f"{path}: {self.total} rows cannot feed {world} ranks")
        self.epoch = self.position = self.bad_rows = self.filtered = 0
        self._order_epoch = -1
        self._order: list[_RowGroup] = []
        self._starts: list[int] = []
        self._window_key: tuple[int, int, int] | None = None
        self._window: pa.Table | None = None
        self._window_perm = np.zeros(0, np.int64)
        self._reader: tuple[_RowGroup, int, Iterator[pa.Table]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Ray ships sources to actors by pickling: drop the open reader and the cached window, which
        # are rebuilt from (epoch, position) on the next read.
        return {**self.__dict__, "_reader": None, "_window": None, "_window_key": None}

    def __len__(self) -> int:
        """Rows this rank sees per epoch (bad and filtered rows included)."""
        return len(range(self.rank, self.total, self.world))

    def _convert(self, row: dict[str, Any]) -> T | None:
        """One record from a row's values; None drops it as filtered; raise _BadRow for a bad row."""
        raise NotImplementedError

    # -- walking ----------------------------------------------------------------------------------

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *keys])

    def _locate(self, q: int) -> tuple[int, int, int]:
        """Index in the epoch's row-group order, window and in-window offset of the epoch's q-th row."""
        if self._order_epoch != self.epoch:
            perm = self._rng().permutation(len(self.groups)) if self.shuffle else range(len(self.groups))
            self._order = [self.groups[i] for i in perm]
            self._starts = list(np.cumsum([0] + [g.rows for g in self._order[:-1]]))
            self._order_epoch = self.epoch
        k = bisect.bisect_right(self._starts, q) - 1
        offset = q - int(self._starts[k])
        return k, offset // self.window_rows, offset % self.window_rows

    def _windows(self, group: _RowGroup) -> Iterator[pa.Table]:
        """Consecutive windows of `window_rows` rows of one row group, streamed as record batches."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pending: list[pa.RecordBatch] = []
        size = 0
        file = pq.ParquetFile(self.files[group.file])
        for batch in file.iter_batches(
            batch_size=self.window_rows, row_groups=[group.index], columns=self.columns
        ):
            pending.append(batch)
            size += batch.num_rows
            while size >= self.window_rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, self.window_rows)
                pending, size = table.slice(self.window_rows).to_batches(), size - self.window_rows
        if size:
            yield pa.Table.from_batches(pending)

    def _read_window(self, group: _RowGroup, w: int) -> None:
        if self._reader is None or self._reader[0] != group or self._reader[1] > w:
            self._reader = (group, 0, self._windows(group))
        _, at, it = self._reader
        for _ in range(w - at):  # seeking after a resume skips earlier windows of this row group
            next(it)
        self._window = next(it)
        self._reader = (group, w + 1, it)
        perm_size = self._window.num_rows
        self._window_perm = (
            self._rng(group.file, group.index, w).permutation(perm_size)
            if self.shuffle
            else np.arange(perm_size)
        )

    def _next_row(self) -> tuple[str, dict[str, Any]]:
        """(where, column values) of this rank's next row, advancing the position; wraps epochs."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        k, w, j = self._locate(self.rank + self.position * self.world)
        group = self._order[k]
        if self._window_key != (self.epoch, k, w):
            self._read_window(group, w)
            self._window_key = (self.epoch, k, w)
        assert self._window is not None
        i = int(self._window_perm[j])
        self.position += 1
        where = f"{self.files[group.file]}: row {group.first_row + w * self.window_rows + i}"
        return where, {c: self._window.column(c)[i].as_py() for c in self.columns}

    def _next_record(self) -> T | None:
        """This rank's next row as a record; None for a filtered row or a skipped (counted) bad one."""
        where, row = self._next_row()
        try:
            record = self._convert(row)
        except _BadRow as exc:
            if self.on_bad_row == "error":
                raise DataError(f"{where}: {exc}") from None
            self.bad_rows += 1
            return None
        self.filtered += record is None
        return record

    def _take(self, n: int) -> list[T]:
        """The next n good records of this rank."""
        out: list[T] = []
        since_good = 0
        while len(out) < n:
            record = self._next_record()
            if record is not None:
                out.append(record)
                since_good = 0
            elif (since_good := since_good + 1) > len(self):  # an epoch without one usable row
                raise DataError(
                    f"{self.path}: no usable rows for rank {self.rank} "
                    f"({self.bad_rows} bad, {self.filtered} filtered)"
                )
        return out

    def read_epoch(self) -> list[T]:
        """Every good record of this rank in epoch 0, without moving the source (e.g. eval prompts)."""
        saved = self.state()
        self.epoch = self.position = 0
        try:
            records = [self._next_record() for _ in range(len(self))]
        finally:
            self.load_state(saved)
        return [r for r in records if r is not None]

    # -- resuming ---------------------------------------------------------------------------------

    def state(self) -> dict[str, int]:
        """Where this rank stands, as plain ints for a checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "bad_rows": self.bad_rows,
            "filtered": self.filtered,
            "rows": self.total,
            "rank": self.rank,
            "world": self.world,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }

    def load_state(self, state: Mapping[str, int]) -> None:
        """Continue from `state()` of a source over the same files, rank, world, seed and shuffle."""
        mine = self.state()
        for key in ("rows", "rank", "world", "seed", "shuffle"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"{self.path}: cannot resume: saved {key}={state.get(key)!r}, now {mine[key]!r}"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.bad_rows, self.filtered = int(state["bad_rows"]), int(state["filtered"])


def _text(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(f"{column}: empty or missing text ({value!r})")
    return value


def _image(row: dict[str, Any], column: str, size: int | None) -> np.ndarray:
    """uint8 [H, W, 3] from PNG/JPEG bytes (or a datasets-style {'bytes': ...} struct); center-cropped
    and resized to size x size when size is set."""
    from PIL import Image

    value = row[column]
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes) or not value:
        raise _BadRow(f"{column}: no image bytes")
    try:
        with Image.open(io.BytesIO(value)) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _BadRow(f"{column}: cannot decode image ({exc})") from None
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


class PromptSource(_Source[str]):
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


class ImageCaptionSource(_Source[tuple[np.ndarray, str]]):
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


class PreferenceSource(_Source[tuple[str, np.ndarray, np.ndarray]]):
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
            raise _BadRow(f"{self.label_column}: expected 0, 0.5 or 1, got {label!r}")
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
    on_bad_row: Literal["error", "skip"] = "error"
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
