"""`composition`: a GenEval-style scorer for the shapes world (orchestrator/shapes_world.py).

It reads the objects back from the pixels and checks them against what the prompt asks for:
1. every pixel takes the nearest palette colour, or the background when it is nearer or when no colour
   is within `colour_tolerance` (RGB distance);
2. same-colour pixels are grouped into 4-connected components (a bulk numpy union-find over the whole
   batch at once; scipy is not a dependency), specks under `min_area` of the image are dropped;
3. a component whose centroid sits low in its bounding box is a triangle (apex up: the centroid is 1/6
   of the height below the box centre; we accept from 0.05, as blur eats the apex), otherwise its fill
   ratio (area over bounding-box area) tells a square (1) from a circle (pi/4; 0.85 at most at 9 px).
   Both features survive the blur of generated samples better than the fill ratio alone (a blurred
   triangle fills ~0.7 of its box).
With E the multiset of (colour, shape) objects the prompt asks for and D the detected one, per item:
  object = |E ∩ D| / |E|,  colour = |colours(E) ∩ colours(D)| / |E|,  shape likewise,
  count = min(|D|, |E|) / max(|D|, |E|),  exact = 1 if D == E,
  composition = (object/2 + colour/4 + shape/4) · min(1, |E| / |D|).
Partial credit (a right colour with a wrong shape, one of two circles) keeps the primary head graded,
which group-relative RL needs; the last factor takes away credit for extra objects.

Example:
    scorer = make_scorer("composition")
    batch = scorer.score(images_uint8_nhwc, ["two red circles and a blue square", ...])
    batch.scores["composition"], batch.extras["exact"]  # float32 [N] each
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.shapes_world import BACKGROUND, COLOURS, SHAPES, parse_caption
from rewards.base import ScoreBatch, ScorerInfo, register

_COLOUR_NAMES = list(COLOURS)
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # [1 + K, 3]; index 0 = background
# Thresholds tuned on rendered scenes with blur and noise added (stand-ins for generated samples):
# digital circles of 9+ px fill at most 0.852 of their box, squares 1, blurred noisy squares ~0.87;
# a clean triangle's centroid sits 1/6 of its height below the box centre, a blurred one ~0.08-0.12.
_SQUARE_FILL = 0.86
_TRIANGLE_OFFSET = 0.05


@dataclass(frozen=True, slots=True)
class Detection:
    """One object read from an image."""

    image: int
    colour: str
    shape: str
    area: int
    """Pixels in the component."""
    box: tuple[int, int, int, int]
    """Bounding box (top, left, bottom, right), inclusive."""


def _colour_ids(images: np.ndarray, tolerance: float) -> np.ndarray:
    """int8 [N, H, W]: palette colour index per pixel, -1 for background or unknown colours."""
    pix = images.reshape(-1, 3).astype(np.float32)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2 as one small matmul: 4x faster than broadcasting differences.
    part = (_PALETTE * _PALETTE).sum(1) - 2 * pix @ _PALETTE.T  # [M, 1 + K]
    nearest = part.argmin(1)
    far = part[np.arange(len(pix)), nearest] + (pix * pix).sum(1) > tolerance * tolerance
    ids = np.where(far | (nearest == 0), -1, nearest - 1).astype(np.int8)
    return ids.reshape(images.shape[:3])


def _components(ids: np.ndarray) -> np.ndarray:
    """int64 [N*H*W]: per pixel, the flat index of its component's root pixel; -1 on background.

    Union-find done in bulk: every round hooks, for each link between same-colour 4-neighbours whose
    trees differ, the larger root under the smallest root it touches, then flattens the forest by
    pointer jumping. Roots only decrease, so there are no cycles; a handful of rounds suffice.
    """
    flat_index = np.arange(ids.size).reshape(ids.shape)
    left, right = [], []
    for one, other in ((np.s_[:, :, :-1], np.s_[:, :, 1:]), (np.s_[:, :-1, :], np.s_[:, 1:, :])):
        same = (ids[one] >= 0) & (ids[one] == ids[other])
        left.append(flat_index[one][same])
        right.append(flat_index[other][same])
    a, b = np.concatenate(left), np.concatenate(right)
    parent = np.arange(ids.size)
    while True:
        ra, rb = parent[a], parent[b]
        open_links = ra != rb
        if not open_links.any():
            break
        a, b, ra, rb = a[open_links], b[open_links], ra[open_links], rb[open_links]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while not np.array_equal(jumped := parent[parent], parent):
            parent = jumped
    return np.where(ids.reshape(-1) >= 0, parent, -1)


def detect(images: np.ndarray, colour_tolerance: float = 100.0, min_area: float = 0.012) -> list[Detection]:
    """Objects in a batch of shapes-world pictures, uint8 [N, H, W, 3]; min_area is a fraction of H*W."""
    _, h, w, _ = images.shape
    ids = _colour_ids(images, colour_tolerance)
    roots = _components(ids)
    pixels = np.flatnonzero(roots >= 0)
    if pixels.size == 0:
        return []
    uniq, inverse, area = np.unique(roots[pixels], return_inverse=True, return_counts=True)
    rows, cols = (pixels // w) % h, pixels % w
    top = np.full(uniq.size, h, np.int64)
    left = np.full(uniq.size, w, np.int64)
    bottom = np.full(uniq.size, -1, np.int64)
    right = np.full(uniq.size, -1, np.int64)
    np.minimum.at(top, inverse, rows)
    np.minimum.at(left, inverse, cols)
    np.maximum.at(bottom, inverse, rows)
    np.maximum.at(right, inverse, cols)
    height = bottom - top + 1
    fill = area / (height * (right - left + 1))
    offset = (np.bincount(inverse, rows) / area - (top + bottom) / 2) / height
    shape = np.where(
        offset >= _TRIANGLE_OFFSET,
        SHAPES.index("triangle"),
        np.where(fill >= _SQUARE_FILL, SHAPES.index("square"), SHAPES.index("circle")),
    )
    colour = ids.reshape(-1)[uniq]
    keep = np.flatnonzero(area >= min_area * h * w)
    return [
        Detection(
            image=int(uniq[k] // (h * w)),
            colour=_COLOUR_NAMES[colour[k]],
            shape=SHAPES[shape[k]],
            area=int(area[k]),
            box=(int(top[k]), int(left[k]), int(bottom[k]), int(right[k])),
        )
        for k in keep
    ]


@register("composition")
class CompositionScorer:
    """Scores shapes-world images against their captions; heads: composition; extras: count, colour,
    shape, exact. A prompt that parse_caption cannot read fails that item (ok False, reason)."""

    def __init__(
        self, colour_tolerance: float = 100.0, min_area: float = 0.012, max_batch: int = 256
    ) -> None:
        if colour_tolerance <= 0 or not 0 <= min_area < 1:
            raise ValueError(
                f"composition: need colour_tolerance > 0 and 0 <= min_area < 1, got "
                f"{colour_tolerance}, {min_area}"
            )
        self.colour_tolerance = colour_tolerance
        self.min_area = min_area
        self.max_batch = max_batch

    def info(self) -> ScorerInfo:
        return ScorerInfo(
            name="composition",
            version="1",
            heads=["composition"],
            input_size=None,
            max_batch=self.max_batch,
        )

    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"composition: expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"composition: {images.shape[0]} images but {len(prompts)} prompts")
        n, k, s = images.shape[0], len(_COLOUR_NAMES), len(SHAPES)
        expected = np.zeros((n, k, s), np.int64)  # [N, colours, shapes] object counts
        errors = [""] * n
        for i, prompt in enumerate(prompts):
            try:
                for g in parse_caption(prompt):
                    expected[i, _COLOUR_NAMES.index(g.colour), SHAPES.index(g.shape)] += g.count
            except ValueError as exc:
                errors[i] = f"unparseable prompt: {exc}"
        found = np.zeros((n, k, s), np.int64)
        for d in detect(images, self.colour_tolerance, self.min_area):
            found[d.image, _COLOUR_NAMES.index(d.colour), SHAPES.index(d.shape)] += 1
        heads = _agreement(expected, found)
        ok = np.array([e == "" for e in errors], dtype=bool)
        for arr in heads.values():
            arr[~ok] = np.nan  # never a silent 0: ScoreBatch keeps our reason and ok False
        composition = heads.pop("composition")
        return ScoreBatch(scores={"composition": composition}, extras=heads, ok=ok, errors=errors)


@dataclass(frozen=True, slots=True)
class ShapeReading:
    """How a batch's objects were read back, per shape asked for: a diagnosis the composition score's
    means hide (RL can raise the shape score by drawing rounder objects, losing its squares)."""

    read_as: dict[str, dict[str, int]]
    """asked shape -> read shape -> detections. A detection counts for the group of its colour, in
    images whose prompt names that colour in one group only (so every such detection has one asked shape)."""
    areas: dict[str, float]
    """read shape -> mean area in pixels of the detections read as it (all detections)."""

    def rate(self, asked: str, read: str) -> float:
        """The share of `asked` shapes' detections read as `read` (nan when none was asked)."""
        row = self.read_as.get(asked, {})
        total = sum(row.values())
        return row.get(read, 0) / total if total else float("nan")


def read_shapes(
    images: np.ndarray, prompts: list[str], colour_tolerance: float = 100.0, min_area: float = 0.012
) -> ShapeReading:
    """`ShapeReading` of uint8 [N, H, W, 3] images against their prompts (`scripts/shape_report.py` prints
    one per evaluation of a run)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"read_shapes: {images.shape[0]} images but {len(prompts)} prompts")
    asked: list[dict[str, str]] = []  # per image: colour -> shape, for colours named in one group only
    for i, prompt in enumerate(prompts):
        try:
            groups = parse_caption(prompt)
        except ValueError as exc:
            raise ValueError(f"read_shapes: prompt {i} {prompt!r}: {exc}") from exc
        colours = [g.colour for g in groups]
        asked.append({g.colour: g.shape for g in groups if colours.count(g.colour) == 1})
    read_as = {a: {r: 0 for r in SHAPES} for a in SHAPES}
    areas: dict[str, list[int]] = {r: [] for r in SHAPES}
    for d in detect(images, colour_tolerance, min_area):
        areas[d.shape].append(d.area)
        if (shape := asked[d.image].get(d.colour)) is not None:
            read_as[shape][d.shape] += 1
    return ShapeReading(
        read_as=read_as, areas={r: float(np.mean(a)) if a else float("nan") for r, a in areas.items()}
    )


def _agreement(expected: np.ndarray, found: np.ndarray) -> dict[str, np.ndarray]:
    """Head name -> float32 [N] from object counts int [N, colours, shapes] asked for and found."""
    e_total = np.maximum(expected.sum((1, 2)), 1)  # an unparseable item has 0; it is masked later
    d_total = found.sum((1, 2))
    obj = np.minimum(expected, found).sum((1, 2)) / e_total
    colour = np.minimum(expected.sum(2), found.sum(2)).sum(1) / e_total
    shape = np.minimum(expected.sum(1), found.sum(1)).sum(1) / e_total
    count = np.minimum(d_total, e_total) / np.maximum(d_total, e_total)
    exact = (expected == found).all((1, 2))
    composition = (0.5 * obj + 0.25 * colour + 0.25 * shape) * np.minimum(
        1.0, e_total / np.maximum(d_total, 1)
    )
    return {
        name: arr.astype(np.float32)
        for name, arr in (
            ("composition", composition),
            ("count", count),
            ("colour", colour),
            ("shape", shape),
            ("exact", exact),
        )
    }


__all__ = ["CompositionScorer", "Detection", "ShapeReading", "detect", "read_shapes"]
