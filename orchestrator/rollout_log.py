"""Every scored rollout, appended to Arrow/parquet part files: analyse runs later, reuse them as offline data.

Parquet files cannot be appended to, so rows are buffered and each flush (every `flush_rows` rows, and on
close) writes a new part file, atomically (temporary name, then rename): a run killed mid-flush leaves
no half-written part. `read_rollout_log(dir)` reads all parts back as one table.

Columns: step, stage (preview / final / eval), prompt, seed, group_id, policy_version, precision, ok,
reward (the combined, normalised total), `score/<scorer>` for each raw score and `score/<scorer>/<sub>`
for each sub-score, and a PNG thumbnail.

    log = RolloutLog(run_dir / "rollouts")
    log.append(rollouts, rewards, stage="final", step=12)
    log.drop_after(10)        # on resume from the step-10 checkpoint: rows of the lost steps go
    table = read_rollout_log(run_dir / "rollouts")
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.records import Rewards, Rollouts

STAGES = ("preview", "final", "eval")
BASE_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("stage", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("group_id", pa.int64()),
        ("policy_version", pa.int64()),
        ("precision", pa.string()),
        ("ok", pa.bool_()),
        ("reward", pa.float32()),
        ("thumbnail", pa.binary()),
    ]
)
_PART = re.compile(r"part-(\d{6})\.parquet")


def thumbnail_png(image: np.ndarray, side: int) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image, shrunk (aspect kept) so its longer side is at most `side`."""
    from PIL import Image

    im = Image.fromarray(image)
    if max(im.size) > side:
        im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class RolloutLog:
    """Buffers scored rollouts as Arrow batches and writes a part file every `flush_rows` rows."""

    def __init__(self, directory: Path, *, flush_rows: int = 512, thumbnail: int = 64) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows: must be >= 1, got {flush_rows}")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.thumbnail = thumbnail
        self._batches: list[pa.RecordBatch] = []
        self._pending = 0
        self.rows_written = 0

    def append(self, roll: Rollouts, rew: Rewards, *, stage: str, step: int) -> None:
        """Log one scored batch (rows in the order of `roll`)."""
        n = len(roll)
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
        if len(rew.total) != n or len(rew.ok) != n:
            raise ValueError(f"rewards: {len(rew.total)} totals / {len(rew.ok)} ok flags for {n} rollouts")
        columns: dict[str, pa.Array] = {
            "step": pa.array(np.full(n, step, np.int64)),
            "stage": pa.array([stage] * n, pa.string()),
            "prompt": pa.array(roll.prompts, pa.string()),
            "seed": pa.array(roll.seeds.numpy().astype(np.int64)),
            "group_id": pa.array(roll.group_ids.numpy().astype(np.int64)),
            "policy_version": pa.array(np.full(n, roll.policy_version, np.int64)),
            "precision": pa.array([roll.precision] * n, pa.string()),
            "ok": pa.array(rew.ok.numpy().astype(bool)),
            "reward": pa.array(rew.total.float().numpy()),
            "thumbnail": pa.array([thumbnail_png(im, self.thumbnail) for im in roll.images], pa.binary()),
        }
        for name, values in sorted({**rew.per_scorer, **rew.extras}.items()):
            columns[f"score/{name}"] = pa.array(values.float().numpy())
        self._batches.append(pa.RecordBatch.from_pydict(columns))
        self._pending += n
        if self._pending >= self.flush_rows:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered rows as the next part file; returns it (None when nothing was buffered)."""
        if not self._batches:
            return None
        table = pa.concat_tables(
            [pa.Table.from_batches([b]) for b in self._batches], promote_options="permissive"
        )
        path = self.dir / f"part-{self._next_index():06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.rename(path)
        self.rows_written += table.num_rows
        self._batches, self._pending = [], 0
        return path

    def drop_after(self, step: int) -> int:
        """Remove rows logged after `step` (a resumed run repeats those steps); returns how many went.
        Buffered rows are dropped too; part files are rewritten atomically."""
        return self._drop(lambda t: pc.greater(t.column("step"), step))

    def drop_stage(self, stage: str, step: int) -> int:
        """Remove the `stage` rows of `step`: a phase that runs again after a restore (the final evaluation)
        replaces its rows instead of adding a second copy; returns how many went."""
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
        return self._drop(
            lambda t: pc.and_(pc.equal(t.column("step"), step), pc.equal(t.column("stage"), stage))
        )

    def _drop(self, doomed: Callable[[pa.Table | pa.RecordBatch], pa.ChunkedArray | pa.Array]) -> int:
        kept = [b.filter(pc.invert(doomed(b))) for b in self._batches]
        removed = sum(b.num_rows for b in self._batches) - sum(b.num_rows for b in kept)
        self._batches = [b for b in kept if b.num_rows]
        self._pending = sum(b.num_rows for b in self._batches)
        for part in _parts(self.dir):
            table = pq.read_table(part)
            keep = table.filter(pc.invert(doomed(table)))
            if keep.num_rows == table.num_rows:
                continue
            removed += table.num_rows - keep.num_rows
            if keep.num_rows == 0:
                part.unlink()
            else:
                tmp = part.with_name(f".{part.name}.tmp")
                pq.write_table(keep, tmp)
                tmp.rename(part)
        return removed

    def _next_index(self) -> int:
        parts = _parts(self.dir)
        return int(_PART.fullmatch(parts[-1].name).group(1)) + 1 if parts else 0  # type: ignore[union-attr]

    def close(self) -> None:
        self.flush()


def _parts(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("part-*.parquet") if _PART.fullmatch(p.name))


def read_rollout_log(directory: Path) -> pa.Table:
    """All part files of a rollout log as one table, in write order (a scorer missing from a part reads
    as null there)."""
    parts = _parts(directory)
    if not parts:
        return BASE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="permissive")


__all__ = ["RolloutLog", "read_rollout_log", "thumbnail_png"]
