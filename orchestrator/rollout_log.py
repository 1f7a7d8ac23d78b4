"""Every scored rollout, appended to Arrow/parquet part files: analyse runs later, reuse as offline data.

Parquet cannot be appended to, so each flush writes a new part file; `read_rollout_log(dir)` reads all
parts back as one table. Columns: step, stage (preview/final/eval), prompt, seed, group_id,
policy_version, precision, ok, reward (the combined total), one column per scorer and sub-score, and a
PNG thumbnail.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.records import Rewards, Rollouts


def _png(image: np.ndarray, side: int) -> bytes:
    from PIL import Image

    im = Image.fromarray(image)
    if max(im.size) > side:
        im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class RolloutLog:
    """Buffers rows and writes a part file every `flush_rows` rows (and on close)."""

    def __init__(self, directory: Path, *, flush_rows: int = 512, thumbnail: int = 64) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.thumbnail = thumbnail
        self._rows: list[dict[str, Any]] = []
        self._part = len(list(self.dir.glob("part-*.parquet")))

    def append(self, roll: Rollouts, rew: Rewards, *, stage: str, step: int) -> None:
        scores = {**rew.per_scorer, **rew.extras}
        for i in range(len(roll)):
            row: dict[str, Any] = {
                "step": step,
                "stage": stage,
                "prompt": roll.prompts[i],
                "seed": int(roll.seeds[i]),
                "group_id": int(roll.group_ids[i]),
                "policy_version": roll.policy_version,
                "precision": roll.precision,
                "ok": bool(rew.ok[i]),
                "reward": float(rew.total[i]),
                "thumbnail": _png(roll.images[i], self.thumbnail),
            }
            row.update({f"score/{k}": float(v[i]) for k, v in scores.items()})
            self._rows.append(row)
        if len(self._rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        keys = sorted({k for r in self._rows for k in r})
        table = pa.table({k: [r.get(k) for r in self._rows] for k in keys})
        pq.write_table(table, self.dir / f"part-{self._part:05d}.parquet")
        self._part += 1
        self._rows = []

    def close(self) -> None:
        self.flush()


def read_rollout_log(directory: Path) -> pa.Table:
    """All part files of a rollout log as one table (columns missing in a part read as null)."""
    import pyarrow.dataset as ds

    parts = sorted(directory.glob("part-*.parquet"))
    schemas = [pq.read_schema(p) for p in parts]
    schema = pa.unify_schemas(schemas) if schemas else pa.schema([])
    return ds.dataset([str(p) for p in parts], schema=schema, format="parquet").to_table()
