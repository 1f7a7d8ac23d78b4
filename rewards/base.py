"""The contract every scorer implements: images and prompts in, scores out, no transport inside.

A scorer never turns a failure into a number: an item it could not score gets `ok=False` and a reason,
so the caller can rescore or drop the whole group instead of training on a silent 0 (DESIGN.md s.7).

Example:
    scorer = make_scorer("jpeg_compressibility")
    batch = scorer.score(images_uint8_nhwc, ["a cat"] * len(images_uint8_nhwc))
    batch.scores["jpeg_compressibility"]  # float32 [N]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(kw_only=True, slots=True)
class ScorerInfo:
    """What a scorer says about itself (the gRPC `Describe` answer)."""

    name: str
    version: str
    heads: list[str]
    """Names of the reward heads; the first is the primary score."""
    input_size: int | None = None
    """Square side in pixels the scorer wants (None: any size)."""
    max_batch: int = 64
    accepts_video: bool = False
    reads_latents: bool = False
    """Whether score() takes `latents` (set by the serving core from its signature, not by the scorer)."""


@dataclass(kw_only=True, slots=True)
class ScoreBatch:
    """Scores for N items. Every array has length N; a failed item has ok False and a reason."""

    scores: dict[str, np.ndarray]
    """head name -> float32 [N]; the primary head is ScorerInfo.heads[0]."""
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    """named sub-scores -> float32 [N] (e.g. 'count', 'colour' for composition)."""
    ok: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """bool [N]: False where the item could not be scored."""
    errors: list[str] = field(default_factory=list)
    """[N] reason per item, '' where ok."""

    def __post_init__(self) -> None:
        n = len(next(iter(self.scores.values()))) if self.scores else 0
        if self.ok.size == 0 and n:
            self.ok = np.ones(n, dtype=bool)
        if not self.errors and n:
            self.errors = [""] * n
        # A NaN/inf score is a failure of that item, never a number to train on.
        for arr in list(self.scores.values()) + list(self.extras.values()):
            bad = ~np.isfinite(arr)
            if bad.any():
                for i in np.flatnonzero(bad & self.ok):
                    self.errors[i] = "non-finite score"
                self.ok = self.ok & ~bad


@runtime_checkable
class RewardModel(Protocol):
    """A scorer. `images` is uint8 [N, H, W, 3] (or [N, T, H, W, 3] for video); prompts has N entries.

    A scorer that also reads the items' latents takes them as a third parameter,
    `score(images, prompts, latents: np.ndarray | None = None)` (float32 [N, ...]); its Describe then says
    so and the trainer sends them. `latents` is None when the caller has none."""

    def info(self) -> ScorerInfo: ...

    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch: ...


ScorerFactory = Callable[..., RewardModel]
_REGISTRY: dict[str, ScorerFactory] = {}


def register(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Class decorator adding a scorer to the registry under `name`."""

    def wrap(factory: ScorerFactory) -> ScorerFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


# Scorer name -> module under rewards.models; imported on demand so heavy deps stay lazy.
SCORER_MODULES: dict[str, str] = {
    "jpeg_compressibility": "jpeg",
    "jpeg_incompressibility": "jpeg",
    "composition": "composition",
    "hpsv2": "hpsv2",
    "imagereward": "imagereward",
    "pickscore": "clip",
    "clipscore": "clip",
    "aesthetic": "aesthetic",
    "vlm": "vlm",
    "physics": "physics",
}


def make_scorer(name: str, **kwargs: Any) -> RewardModel:
    """Build a registered scorer by name; kwargs go to its constructor (weights path, device, ...)."""
    import importlib

    if name not in SCORER_MODULES:
        raise ValueError(f"unknown scorer {name!r} (known: {', '.join(sorted(SCORER_MODULES))})")
    importlib.import_module(f"rewards.models.{SCORER_MODULES[name]}")
    return _REGISTRY[name](**kwargs)
