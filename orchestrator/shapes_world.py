"""The shapes world: a synthetic text-to-image dataset a tiny DiT learns on a CPU in minutes.

Pictures are small RGB squares (32 px by default) on a near-white background with one to three flat
coloured shapes (circle, square, triangle) that never touch, captioned like
"two red circles and a blue square". Everything is a pure function of the seed, and scene `i` of a seed
does not depend on how many scenes are drawn. The world is built for learnability (four well separated
colours, big shapes, at most three objects) and for exact scoring: the `composition` scorer reads
colours, shapes and counts back from pixels and compares them with `parse_caption(prompt)`.

Some (count, colour, shape) groups are held out (`HELDOUT`): the train split never shows them, the
heldout split and `prompt_set` only contain scenes with at least one of them, so RL post-training
works on compositions that pretraining never saw.

Example:
    scenes = generate(1000, seed=0, size=32)
    scenes[0].caption()                # e.g. 'two red circles and a blue square'
    scenes[0].render(32)               # uint8 [32, 32, 3]
    parse_caption("a yellow triangle") # [Group(count=1, colour='yellow', shape='triangle')]
    write_parquet("train.parquet", 4000, seed=0, size=32, split="train")
"""

from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MAX_OBJECTS = 3

_NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Object sizes and spacing as fractions of the image side: at 32 px a shape is 9-13 px wide and two
# shapes are at least ~2.5 px apart, so they never merge into one connected component.
_SIZE_RANGE = (0.28, 0.42)
_GAP = 0.08
_MARGIN = 0.03

Split = Literal["train", "heldout", "all"]


@dataclass(frozen=True, slots=True, order=True)
class Group:
    """`count` objects of one colour and shape, as a caption names them ("two red circles")."""

    count: int
    colour: str
    shape: str

    def phrase(self) -> str:
        return f"{_COUNT_WORDS[self.count]} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


HELDOUT: frozenset[Group] = frozenset(
    Group(count, colour, shape)
    for count, colour, shape in [
        (2, "red", "triangle"),
        (2, "green", "circle"),
        (2, "blue", "square"),
        (2, "yellow", "circle"),
        (3, "red", "square"),
        (3, "green", "triangle"),
        (3, "blue", "circle"),
        (3, "yellow", "square"),
    ]
)
"""Groups the train split never shows; every colour, shape and count still appears there otherwise."""


@dataclass(frozen=True, slots=True)
class ShapeSpec:
    """One object; position and size are fractions of the image side, so any resolution renders it."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    """Side of the square, diameter of the circle, base and height of the (upward) triangle."""

    def mask(self, size: int) -> np.ndarray:
        """bool [size, size]: pixels whose centre lies inside the shape.

        The bounding square is snapped to the pixel grid first, so a shape's area over its pixel
        bounding box stays near its ideal (1, pi/4, 1/2) even at 7-9 px: circles 0.76-0.85, triangles
        0.50-0.57, squares 1. Below 7 px a digital circle fills 0.89 and reads as a square.
        """
        side = max(7, round(self.size * size))
        left, top = round(self.cx * size - side / 2), round(self.cy * size - side / 2)
        pix = np.arange(size) + 0.5
        u = ((pix - left) / side - 0.5)[None, :]  # [-0.5, 0.5] across the box
        v = ((pix - top) / side - 0.5)[:, None]
        box = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
        if self.shape == "square":
            return box
        if self.shape == "circle":
            return box & (u * u + v * v <= 0.25)
        if self.shape == "triangle":  # apex at the top, base at the bottom: fill ratio 1/2
            return box & (np.abs(u) <= (v + 0.5) / 2)
        raise ValueError(f"unknown shape {self.shape!r} (known: {', '.join(SHAPES)})")


@dataclass(slots=True)
class Scene:
    """A picture: objects listed group by group, in the order the caption names them."""

    objects: list[ShapeSpec]

    def groups(self) -> list[Group]:
        """(count, colour, shape) per distinct colour and shape, in order of first appearance."""
        counts: dict[tuple[str, str], int] = {}
        for o in self.objects:
            counts[(o.colour, o.shape)] = counts.get((o.colour, o.shape), 0) + 1
        return [Group(n, colour, shape) for (colour, shape), n in counts.items()]

    def caption(self) -> str:
        return _join([g.phrase() for g in self.groups()])

    def render(self, size: int = 32) -> np.ndarray:
        """uint8 [size, size, 3], flat colours without anti-aliasing."""
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        for o in self.objects:
            image[o.mask(size)] = COLOURS[o.colour]
        return image

    def to_json(self) -> str:
        return json.dumps([asdict(o) for o in self.objects])

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls([ShapeSpec(**o) for o in json.loads(text)])


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_caption(caption: str) -> list[Group]:
    """The groups a caption asks for, in caption order; ValueError naming the part it cannot read.

    Accepts the generator's captions and small variations: "one"/"a"/"an", singular or plural, commas,
    an optional "a photo of" prefix, a trailing period. The same colour and shape named twice add up.
    """
    text = re.sub(r"\s+", " ", caption.strip().lower().rstrip("."))
    text = re.sub(r"^(a )?(photo|picture|image) of ", "", text)
    if not text:
        raise ValueError(f"caption {caption!r}: empty")
    counts: dict[tuple[str, str], int] = {}
    for part in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", text):
        words = part.split(" ")
        if len(words) != 3:
            raise ValueError(
                f"caption {caption!r}: cannot read {part!r} (expected '<number> <colour> <shape>')"
            )
        number, colour, noun = words
        shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
        if number not in _NUMBER_WORDS:
            raise ValueError(f"caption {caption!r}: unknown number {number!r}")
        if colour not in COLOURS:
            raise ValueError(f"caption {caption!r}: unknown colour {colour!r} (known: {', '.join(COLOURS)})")
        if shape not in SHAPES:
            raise ValueError(f"caption {caption!r}: unknown shape {noun!r} (known: {', '.join(SHAPES)})")
        counts[(colour, shape)] = counts.get((colour, shape), 0) + _NUMBER_WORDS[number]
    return [Group(n, colour, shape) for (colour, shape), n in counts.items()]


def compositions(split: Split = "all", max_objects: int = MAX_OBJECTS) -> list[tuple[Group, ...]]:
    """Every scene content up to `max_objects` objects, groups with larger counts first, in a fixed order."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    out: list[tuple[Group, ...]] = []
    # Count partitions of 1..max_objects objects, e.g. (2, 1): two of one kind and one of another.
    partitions = [p for n in range(1, max_objects + 1) for p in _partitions(n)]
    for counts in partitions:
        for picked in itertools.permutations(kinds, len(counts)):
            # Equal counts: keep one order of the kinds, so each content appears once.
            if any(counts[i] == counts[i + 1] and picked[i] > picked[i + 1] for i in range(len(counts) - 1)):
                continue
            comp = tuple(Group(n, c, s) for n, (c, s) in zip(counts, picked))
            held = any(g in HELDOUT for g in comp)
            if split == "all" or (split == "heldout") == held:
                out.append(comp)
    return out


def _partitions(n: int, largest: int | None = None) -> list[tuple[int, ...]]:
    largest = n if largest is None else largest
    if n == 0:
        return [()]
    return [(k, *rest) for k in range(min(n, largest), 0, -1) for rest in _partitions(n - k, k)]


def generate(
    n: int, seed: int, size: int = 32, split: Split = "train", max_objects: int = MAX_OBJECTS
) -> list[Scene]:
    """`n` scenes; scene i depends only on (seed, i, split, max_objects), not on n.

    The number of objects is uniform over 1..max_objects, then the partition of that number into groups
    is uniform, then the content is uniform among those allowed by `split`; groups appear in random order.
    `size` only sets the minimum gap between shapes: 2.5 px or more, so at least one empty pixel remains
    between them after snapping to the pixel grid.
    """
    if n < 0 or size < 24:
        raise ValueError(f"generate: need n >= 0 and size >= 24, got n={n}, size={size}")
    by_partition: dict[tuple[int, ...], list[tuple[Group, ...]]] = {}
    for comp in compositions(split, max_objects):
        by_partition.setdefault(tuple(g.count for g in comp), []).append(comp)
    by_total: dict[int, list[tuple[int, ...]]] = {}
    for partition in by_partition:
        by_total.setdefault(sum(partition), []).append(partition)
    totals = sorted(by_total)
    gap = max(_GAP, 2.5 / size)
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        partitions = by_total[totals[rng.integers(len(totals))]]
        options = by_partition[partitions[rng.integers(len(partitions))]]
        comp = options[rng.integers(len(options))]
        comp = tuple(comp[j] for j in rng.permutation(len(comp)))
        kinds = [(g.colour, g.shape) for g in comp for _ in range(g.count)]
        scenes.append(
            Scene([ShapeSpec(s, c, *box) for (c, s), box in zip(kinds, _place(rng, len(kinds), gap))])
        )
    return scenes


def _place(rng: np.random.Generator, k: int, gap: float) -> list[tuple[float, float, float]]:
    """k (cx, cy, size) boxes inside the frame whose bounding squares are `gap` apart (rejection sampling)."""
    lo, hi = _SIZE_RANGE
    while True:
        boxes: list[tuple[float, float, float]] = []
        for _ in range(200):
            s = float(rng.uniform(lo, hi))
            cx, cy = rng.uniform(s / 2 + _MARGIN, 1 - s / 2 - _MARGIN, size=2)
            if all(
                max(abs(cx - bx), abs(cy - by)) >= (s + bs) / 2 + gap for bx, by, bs in boxes
            ):  # separated along x or y
                boxes.append((float(cx), float(cy), s))
                if len(boxes) == k:
                    return boxes
        hi = max(lo, hi * 0.9)  # crowded: retry the scene with smaller shapes


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(
    path: str | Path,
    n: int,
    seed: int,
    size: int = 32,
    split: Split = "train",
    max_objects: int = MAX_OBJECTS,
    row_group_rows: int = 1024,
) -> Path:
    """Write n rendered scenes: caption, image (PNG), width, height, objects (JSON ground truth), split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("caption", pa.string()),
            ("image", pa.binary()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("objects", pa.string()),
            ("split", pa.string()),
        ]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scenes = generate(n, seed, size, split, max_objects)
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, n, row_group_rows):
            chunk = scenes[lo : lo + row_group_rows]
            columns = {
                "caption": [s.caption() for s in chunk],
                "image": [encode_png(s.render(size)) for s in chunk],
                "width": [size] * len(chunk),
                "height": [size] * len(chunk),
                "objects": [s.to_json() for s in chunk],
                "split": [split] * len(chunk),
            }
            writer.write_table(pa.table(columns, schema=schema))
    return path


def prompt_set(n: int, seed: int, split: Split = "heldout", max_objects: int = MAX_OBJECTS) -> list[str]:
    """n distinct captions of `split` contents (default: each has a held-out group), seeded order."""
    comps = compositions(split, max_objects)
    if n > len(comps):
        raise ValueError(
            f"prompt_set: asked for {n} prompts, the {split} split has only {len(comps)} contents"
        )
    order = np.random.default_rng(seed).permutation(len(comps))[:n]
    return [_join([g.phrase() for g in comps[i]]) for i in order]


def write_prompts(path: str | Path, prompts: list[str]) -> Path:
    """A parquet prompt file (column `prompt`) as PromptSource reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), path)
    return path


@dataclass(frozen=True, slots=True)
class WorldFiles:
    """The files `write_world` makes."""

    train: Path
    """Pretraining records (write_parquet, train split)."""
    rl_prompts: Path
    """Every held-out content's caption, seeded order: the RL stage's prompts."""
    eval_prompts: Path
    """The first `n_eval` of the RL prompts: fixed evaluation before and after RL."""


def write_world(
    out_dir: str | Path, n: int = 4000, seed: int = 0, size: int = 32, n_eval: int = 24
) -> WorldFiles:
    """Everything the demo reads, under out_dir (a few seconds for 4,000 records at 32 px)."""
    out = Path(out_dir)
    rl = prompt_set(len(compositions("heldout")), seed)
    return WorldFiles(
        train=write_parquet(out / "shapes_train.parquet", n, seed, size, "train"),
        rl_prompts=write_prompts(out / "shapes_rl_prompts.parquet", rl),
        eval_prompts=write_prompts(out / "shapes_eval_prompts.parquet", rl[:n_eval]),
    )


__all__ = [
    "BACKGROUND",
    "COLOURS",
    "HELDOUT",
    "SHAPES",
    "Group",
    "Scene",
    "ShapeSpec",
    "WorldFiles",
    "compositions",
    "encode_png",
    "generate",
    "parse_caption",
    "prompt_set",
    "write_parquet",
    "write_prompts",
    "write_world",
]
