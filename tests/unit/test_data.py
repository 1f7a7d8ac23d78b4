"""Parquet sources: streaming, sharding, deterministic shuffling, exact resume, bad input."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.data import (
    DataConfig,
    DataError,
    ImageCaptionSource,
    PreferenceSource,
    PromptSource,
)
from orchestrator.schema import ConfigError, from_dict
from orchestrator.shapes_world import encode_png, generate, write_parquet


def _prompts(path: Path, prompts: list[str | None], row_group_size: int = 20) -> Path:
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), path, row_group_size=row_group_size)
    return path


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def prompt_dir(tmp_path: Path) -> Path:
    """Two files in one directory: 103 + 40 rows, row groups of 20 (the last ones shorter)."""
    _prompts(tmp_path / "a.parquet", [f"p{i}" for i in range(103)])
    _prompts(tmp_path / "b.parquet", [f"p{i}" for i in range(103, 143)], row_group_size=15)
    return tmp_path


def _all(source: PromptSource) -> list[str]:
    return source.next_batch(len(source)).prompts


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_are_disjoint_and_complete(prompt_dir: Path, shuffle: bool) -> None:
    ranks = [
        PromptSource(prompt_dir, rank=r, world=2, shuffle=shuffle, seed=3, window_rows=8) for r in (0, 1)
    ]
    seen = [_all(s) for s in ranks]
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1], key=lambda p: int(p[1:])) == [f"p{i}" for i in range(143)]
    if not shuffle:
        assert seen[0][:3] == ["p0", "p2", "p4"]


def test_shuffle_is_seeded_and_changes_per_epoch(prompt_dir: Path) -> None:
    def source(seed: int) -> PromptSource:
        return PromptSource(prompt_dir, seed=seed, window_rows=8)

    a, b = source(0), source(0)
    first, again = _all(a), _all(b)
    assert first == again
    assert first != [f"p{i}" for i in range(143)]
    second_epoch = _all(a)
    assert sorted(second_epoch) == sorted(first) and second_epoch != first
    assert a.state()["epoch"] == 1
    assert _all(source(1)) != first


def test_resume_continues_at_the_exact_next_record(prompt_dir: Path) -> None:
    def source() -> PromptSource:
        return PromptSource(prompt_dir, rank=1, world=2, seed=5, window_rows=8)

    reference = source().next_batch(200).prompts  # crosses into the third epoch
    for cut in (0, 1, 7, 8, 33, 71, 72, 150):
        running = source()
        head = running.next_batch(cut).prompts if cut else []
        saved = json.loads(json.dumps(running.state()))  # a checkpoint stores it as JSON
        resumed = source()
        resumed.load_state(saved)
        assert head + resumed.next_batch(200 - cut).prompts == reference, cut


def test_a_pickled_source_continues_where_it_was(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "train.parquet", 40, seed=1, size=32, row_group_rows=16)
    source = ImageCaptionSource(path, size=32, seed=2, window_rows=8)
    source.next_batch(5)
    copy = pickle.loads(pickle.dumps(source))  # what Ray does when it ships a source to an actor
    assert copy.next_batch(30).captions == source.next_batch(30).captions


def test_resume_refuses_a_different_layout(prompt_dir: Path) -> None:
    saved = PromptSource(prompt_dir, world=2).state()
    with pytest.raises(DataError, match="world"):
        PromptSource(prompt_dir, world=1).load_state(saved)


def test_streams_one_window_at_a_time(tmp_path: Path) -> None:
    path = _prompts(tmp_path / "big.parquet", [f"p{i}" for i in range(5000)], row_group_size=5000)
    source = PromptSource(path, window_rows=64)
    source.next_batch(100)
    assert source._window is not None and source._window.num_rows <= 64


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(DataError, match=r"x\.parquet: missing column 'prompt'.*text"):
        PromptSource(path, "prompt")
    with pytest.raises(DataError, match="no such"):
        PromptSource(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet"):
        PromptSource(tmp_path / "junk.parquet")
    with pytest.raises(DataError, match="cannot feed 2 ranks"):
        PromptSource(path, "text", world=2)


def test_empty_prompts_error_or_are_skipped_and_counted(tmp_path: Path) -> None:
    rows: list[str | None] = [f"p{i}" for i in range(30)]
    rows[7], rows[21] = "  ", None
    path = _prompts(tmp_path / "p.parquet", rows, row_group_size=10)
    with pytest.raises(DataError, match=r"p\.parquet: row 7: prompt: empty"):
        PromptSource(path, shuffle=False).next_batch(30)
    skipping = PromptSource(path, shuffle=False, on_bad_row="skip")
    got = skipping.next_batch(28).prompts
    assert got == [r for r in rows if r and r.strip()] and skipping.bad_rows == 2
    assert skipping.state()["bad_rows"] == 2


def test_skip_mode_with_nothing_usable_stops(tmp_path: Path) -> None:
    path = _prompts(tmp_path / "p.parquet", ["", " "])
    with pytest.raises(DataError, match="no usable rows"):
        PromptSource(path, on_bad_row="skip").next_batch(1)


def test_image_caption_source_decodes_the_shapes_world(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "train.parquet", 64, seed=2, size=32, row_group_rows=16)
    source = ImageCaptionSource(path, size=32, shuffle=False)
    batch = source.next_batch(10)
    assert batch.images.shape == (10, 32, 32, 3) and batch.images.dtype == np.uint8
    scenes = generate(10, seed=2, size=32)
    assert batch.captions == [s.caption() for s in scenes]
    assert all(np.array_equal(img, s.render(32)) for img, s in zip(batch.images, scenes))
    assert PromptSource(path).column == "caption"


def test_images_are_resized_and_datasets_structs_read(tmp_path: Path) -> None:
    path = tmp_path / "mixed.parquet"
    image = pa.array(
        [
            {"bytes": _jpeg((200, 0, 0), (48, 40)), "path": None},
            {"bytes": encode_png(np.zeros((16, 16, 3), np.uint8)), "path": None},
        ]
    )
    pq.write_table(pa.table({"image": image, "caption": ["red", "black"]}), path)
    batch = ImageCaptionSource(path, size=32, shuffle=False).next_batch(2)
    assert batch.images.shape == (2, 32, 32, 3)
    assert batch.images[0, 16, 16, 0] > 150 and batch.images[1].max() == 0


def test_broken_images_error_or_are_skipped_and_counted(tmp_path: Path) -> None:
    good = encode_png(generate(1, seed=0)[0].render(32))
    images = [good] * 6
    images[2] = good[: len(good) // 2]  # truncated PNG
    images[4] = b"garbage"
    path = tmp_path / "imgs.parquet"
    pq.write_table(pa.table({"image": images, "caption": ["c"] * 6}), path)
    with pytest.raises(DataError, match=r"imgs\.parquet: row 2: image: cannot decode"):
        ImageCaptionSource(path, shuffle=False).next_batch(6)
    skipping = ImageCaptionSource(path, shuffle=False, on_bad_row="skip")
    assert len(skipping.next_batch(4).captions) == 4 and skipping.bad_rows == 2


def test_preference_pairs_order_and_ties(tmp_path: Path) -> None:
    red, blue = _jpeg((220, 30, 30)), _jpeg((30, 30, 220))
    table = pa.table(
        {
            "caption": ["a", "b", "c", "d"],
            "jpg_0": [red, red, red, red],
            "jpg_1": [blue, blue, blue, blue],
            "label_0": [1.0, 0.0, 0.5, 1.0],
            "label_1": [0.0, 1.0, 0.5, 0.0],
        }
    )
    path = tmp_path / "pick.parquet"
    pq.write_table(table, path)
    source = PreferenceSource(path, size=32, shuffle=False)
    batch = source.next_batch(3)
    assert batch.prompts == ["a", "b", "d"] and source.ties == 1
    assert batch.preferred.shape == batch.rejected.shape == (3, 32, 32, 3)
    is_red = batch.preferred[:, 16, 16, 0] > batch.preferred[:, 16, 16, 2]
    assert is_red.tolist() == [True, False, True]
    assert (batch.rejected[:, 16, 16, 0] > batch.rejected[:, 16, 16, 2]).tolist() == [False, True, False]
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(3, "label_0", pa.array([1.0, 0.3, 0.5, None])), bad)
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: label_0"):
        PreferenceSource(bad, shuffle=False).next_batch(2)


def test_data_config_resolves_paths_and_builds_sources(tmp_path: Path) -> None:
    recipe_dir = tmp_path / "recipes"
    (recipe_dir / "data").mkdir(parents=True)
    _prompts(recipe_dir / "data" / "p.parquet", ["x", "y", "z"])
    config = from_dict(
        DataConfig, {"prompts": "data/p.parquet", "eval_prompts": "data/p.parquet", "seed": 4}, "data"
    )
    config.resolve(recipe_dir)  # in place, as load_recipe calls it
    assert config.prompts == str(recipe_dir / "data" / "p.parquet") and config.dataset is None
    assert config.resolve("/elsewhere").prompts == config.prompts  # absolute paths stay
    assert config.paths() == {
        "prompts": config.prompts,
        "dataset": None,
        "preferences": None,
        "eval_prompts": config.eval_prompts,
    }
    assert config.read_eval_prompts() == ["x", "y", "z"]
    source = config.prompt_source(rank=1, world=2)
    assert source.seed == 4 and len(source) == 1
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        config.dataset_source(size=32)
    with pytest.raises(ConfigError, match=r"data\.on_bad_row"):
        from_dict(DataConfig, {"on_bad_row": "ignore"}, "data")
    with pytest.raises(ConfigError, match=r"data\.window_rows"):
        from_dict(DataConfig, {"window_rows": 0}, "data")
