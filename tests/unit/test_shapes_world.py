"""The shapes world: deterministic, captions that say what the pixels show, held-out splits, parquet."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.shapes_world import (
    BACKGROUND,
    COLOURS,
    HELDOUT,
    Group,
    Scene,
    compositions,
    generate,
    parse_caption,
    prompt_set,
    write_parquet,
    write_prompts,
    write_world,
)


def test_generate_is_deterministic_and_prefix_stable() -> None:
    a, b = generate(60, seed=7), generate(60, seed=7)
    assert [s.caption() for s in a] == [s.caption() for s in b]
    assert all(np.array_equal(x.render(32), y.render(32)) for x, y in zip(a, b))
    # Scene i depends on (seed, i) only: drawing fewer scenes gives the same first ones.
    assert generate(20, seed=7) == a[:20]
    other = generate(60, seed=8)
    assert sum(x != y for x, y in zip(a, other)) > 50


@pytest.mark.parametrize("size", [32, 64])
def test_render_shows_exactly_the_captioned_objects(size: int) -> None:
    for scene in generate(150, seed=1, size=size):
        image = scene.render(size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        masks = [o.mask(size) for o in scene.objects]
        covered = np.zeros((size, size), dtype=bool)
        for obj, mask in zip(scene.objects, masks):
            assert mask.sum() >= 20, "shapes are big enough to read back"
            assert (image[mask] == COLOURS[obj.colour]).all()
            # Objects never touch (4-neighbourhood), so each is its own connected component.
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            assert not (grown & covered).any()
            covered |= mask
        assert (image[~covered] == BACKGROUND).all()
        # The caption counts what was drawn.
        groups = parse_caption(scene.caption())
        assert sum(g.count for g in groups) == len(scene.objects) <= 3
        for g in groups:
            drawn = sum(o.colour == g.colour and o.shape == g.shape for o in scene.objects)
            assert drawn == g.count


def test_parse_caption_round_trips_and_accepts_variants() -> None:
    for scene in generate(300, seed=2, split="all"):
        assert parse_caption(scene.caption()) == scene.groups()
    assert parse_caption("A photo of one red circle.") == [Group(1, "red", "circle")]
    assert parse_caption("two blue squares, a green triangle, and three yellow circles") == [
        Group(2, "blue", "square"),
        Group(1, "green", "triangle"),
        Group(3, "yellow", "circle"),
    ]
    assert parse_caption("a red circle and a red circle") == [Group(2, "red", "circle")]


@pytest.mark.parametrize(
    ("caption", "word"),
    [
        ("", "empty"),
        ("a purple circle", "purple"),
        ("two red hexagons", "hexagons"),
        ("red circle", "red circle"),
        ("many red circles", "many"),
        ("a red circle and", "cannot read"),
    ],
)
def test_parse_caption_names_what_it_cannot_read(caption: str, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        parse_caption(caption)


def test_heldout_groups_never_appear_in_train() -> None:
    train, held = compositions("train"), compositions("heldout")
    everything = compositions("all")
    assert not set(train) & set(held) and set(train) | set(held) == set(everything)
    as_multisets = {frozenset(c) for c in everything}
    assert len(as_multisets) == len(everything), "each content is listed once"
    for scene in generate(400, seed=3, split="train"):
        assert not set(scene.groups()) & HELDOUT
    for scene in generate(100, seed=3, split="heldout"):
        assert set(scene.groups()) & HELDOUT
    # Every colour, shape and count is still taught by the train split.
    seen = {(g.count, g.colour, g.shape) for c in train for g in c}
    assert {c for c, _, _ in seen} == {1, 2, 3}
    assert {col for _, col, _ in seen} == set(COLOURS)


def test_prompt_set_is_heldout_distinct_and_seeded() -> None:
    prompts = prompt_set(24, seed=0)
    assert prompts == prompt_set(24, seed=0) != prompt_set(24, seed=1)
    assert len(set(prompts)) == 24
    assert all(set(parse_caption(p)) & HELDOUT for p in prompts)
    with pytest.raises(ValueError, match="only"):
        prompt_set(10_000, seed=0)


def test_write_parquet_round_trips(tmp_path: Path) -> None:
    start = time.perf_counter()
    path = write_parquet(tmp_path / "train.parquet", 1500, seed=4, size=32, row_group_rows=512)
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"1500 records took {elapsed:.1f}s"
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 1500 and meta.num_row_groups == 3
    table = pq.read_table(path)
    assert table.column_names == ["caption", "image", "width", "height", "objects", "split"]
    scenes = generate(1500, seed=4, size=32)
    for i in (0, 511, 512, 1499):
        row = {k: v[0] for k, v in table.slice(i, 1).to_pydict().items()}
        scene = Scene.from_json(row["objects"])
        assert scene == scenes[i] and row["caption"] == scene.caption() and row["split"] == "train"
        image = np.asarray(Image.open(io.BytesIO(row["image"])))
        assert image.shape == (row["height"], row["width"], 3)
        assert np.array_equal(image, scene.render(32))


def test_write_prompts(tmp_path: Path) -> None:
    prompts = prompt_set(5, seed=0)
    table = pq.read_table(write_prompts(tmp_path / "p" / "prompts.parquet", prompts))
    assert table.column("prompt").to_pylist() == prompts


def test_write_world_and_the_shipped_prompt_files(tmp_path: Path) -> None:
    files = write_world(tmp_path, n=50, seed=0, size=32, n_eval=10)
    rl = pq.read_table(files.rl_prompts).column("prompt").to_pylist()
    evals = pq.read_table(files.eval_prompts).column("prompt").to_pylist()
    assert evals == rl[:10] and len(set(rl)) == len(compositions("heldout"))
    assert pq.read_table(files.train).num_rows == 50
    # recipes/data ships the seed-0 prompt files; they must stay what the generator makes.
    shipped = Path(__file__).resolve().parents[2] / "recipes" / "data"
    assert pq.read_table(shipped / "shapes_rl_prompts.parquet").column("prompt").to_pylist() == rl
    shipped_eval = pq.read_table(shipped / "shapes_eval_prompts.parquet").column("prompt").to_pylist()
    assert shipped_eval == rl[: len(shipped_eval)]
