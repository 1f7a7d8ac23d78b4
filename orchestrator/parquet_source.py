"""How every parquet data source reads (orchestrator/data.py has the sources themselves): streaming,
sharded across ranks, shuffled deterministically, resumable to the record.

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
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar

import numpy as np

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


class BadRow(Exception):
    """Raised by a source's row conversion; becomes a DataError or a skipped-and-counted row."""


@dataclass(frozen=True, slots=True)
class _RowGroup:
    file: int
    index: int
    first_row: int
    """Index in its file of the row group's first row (for error messages)."""
    rows: int


class ParquetSource(Generic[T]):
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
        """One record from a row's values; None drops it as filtered; raise BadRow for a bad row."""
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
        except BadRow as exc:
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


__all__ = ["BadRow", "DataError", "OnBadRow", "ParquetSource", "ReadArgs"]
