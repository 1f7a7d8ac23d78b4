"""The rollout log: rolling parquet parts read back as one table, every column, thumbnails, resume trim."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actors.records import Rewards, Rollouts
from orchestrator.rollout_log import RolloutLog, read_rollout_log


def batch(n: int, version: int, first_group: int = 0, seed: int = 0) -> tuple[Rollouts, Rewards]:
    g = torch.Generator().manual_seed(seed)
    images = np.random.default_rng(seed).integers(0, 256, (n, 96, 128, 3), dtype=np.uint8)
    roll = Rollouts(
        policy_version=version, precision="nvfp4", steps=6,
        prompts=[f"{i} red circles" for i in range(n)],
        group_ids=torch.arange(n) // 2 + first_group, seeds=torch.arange(n) + 1000 * seed,
        text=torch.zeros(n, 4, 8), text_mask=torch.ones(n, 4, dtype=torch.bool),
        latents=torch.zeros(n, 3, 4, 4), images=images,
    )  # fmt: skip
    total = torch.randn(n, generator=g)
    ok = torch.ones(n, dtype=torch.bool)
    ok[0] = False
    total[0] = float("nan")  # a failed item: logged, flagged, never a silent 0
    rew = Rewards(
        total=total, per_scorer={"composition": torch.rand(n, generator=g)},
        extras={"composition/count": torch.rand(n, generator=g)}, ok=ok,
    )  # fmt: skip
    return roll, rew


def test_parts_roll_every_n_rows_and_read_back_as_one_table(tmp_path: Path) -> None:
    log = RolloutLog(tmp_path, flush_rows=5, thumbnail=32)
    rolls = [batch(4, version=v, first_group=2 * v, seed=v) for v in range(3)]
    for step, (roll, rew) in enumerate(rolls):
        log.append(roll, rew, stage="preview" if step < 2 else "final", step=step)
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1  # 8 rows buffered past 5 -> one part
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    table = read_rollout_log(tmp_path)
    assert table.num_rows == 12 and log.rows_written == 12
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["policy_version"] for r in rows[::4]] == [0, 1, 2]
    assert (
        rows[9]["stage"] == "final"
        and rows[9]["precision"] == "nvfp4"
        and rows[9]["prompt"] == "1 red circles"
    )
    assert rows[9]["seed"] == 2001 and rows[9]["group_id"] == 4
    roll, rew = rolls[2]
    np.testing.assert_allclose(table.column("reward").to_numpy()[8:], rew.total.numpy())
    np.testing.assert_allclose(
        table.column("score/composition/count").to_numpy()[8:],
        rew.extras["composition/count"].numpy(),
        rtol=1e-6,
    )
    assert [r["ok"] for r in rows[:4]] == [False, True, True, True] and np.isnan(rows[0]["reward"])
    with Image.open(io.BytesIO(rows[9]["thumbnail"])) as im:
        assert im.format == "PNG" and im.size == (32, 24)  # aspect kept, longer side 32
        expect = Image.fromarray(roll.images[1])
        expect.thumbnail((32, 32))
        assert np.array_equal(np.asarray(im), np.asarray(expect))


def test_a_new_log_in_the_same_directory_continues_the_part_numbering(tmp_path: Path) -> None:
    first = RolloutLog(tmp_path)
    first.append(*batch(2, 0), stage="eval", step=0)
    first.close()
    (tmp_path / ".part-000009.parquet.tmp").write_bytes(b"half written")  # a crash mid-flush
    second = RolloutLog(tmp_path)
    second.append(*batch(2, 1, seed=1), stage="eval", step=1)
    second.close()
    assert read_rollout_log(tmp_path).column("step").to_pylist() == [0, 0, 1, 1]
    assert (tmp_path / "part-000001.parquet").exists()


def test_drop_after_removes_rows_of_steps_a_resumed_run_repeats(tmp_path: Path) -> None:
    log = RolloutLog(tmp_path, flush_rows=3)
    for step in range(5):
        log.append(*batch(2, step, seed=step), stage="final", step=step)
    assert log.drop_after(2) == 4  # steps 3 and 4, from written parts and from the buffer
    log.append(*batch(2, 3, seed=30), stage="final", step=3)
    log.close()
    table = read_rollout_log(tmp_path)
    assert table.column("step").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert table.column("seed").to_pylist()[-1] == 30001


def test_drop_stage_removes_only_that_stage_of_that_step(tmp_path: Path) -> None:
    log = RolloutLog(tmp_path, flush_rows=3)
    log.append(*batch(2, 4, seed=1), stage="final", step=4)
    log.append(*batch(2, 4, seed=2), stage="eval", step=4)  # written to a part file
    log.append(*batch(2, 3, seed=3), stage="eval", step=3)
    log.append(*batch(1, 4, seed=4), stage="eval", step=4)  # still buffered
    assert log.drop_stage("eval", 4) == 3
    log.close()
    table = read_rollout_log(tmp_path)
    assert list(zip(table.column("step").to_pylist(), table.column("stage").to_pylist())) == [
        (4, "final"), (4, "final"), (3, "eval"), (3, "eval"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"^stage: expected one of"):
        log.drop_stage("after", 4)


def test_bad_input_names_the_field(tmp_path: Path) -> None:
    log = RolloutLog(tmp_path)
    roll, rew = batch(3, 0)
    with pytest.raises(ValueError, match=r"^stage: expected one of"):
        log.append(roll, rew, stage="train", step=0)
    with pytest.raises(ValueError, match=r"^rewards: 2 totals"):
        log.append(roll, rew.select(torch.tensor([0, 1])), stage="final", step=0)
    assert read_rollout_log(tmp_path / "nothing").num_rows == 0
