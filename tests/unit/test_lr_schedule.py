"""The learning-rate schedule: warm-up, then constant, cosine or linear decay; filled in from the recipe."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from orchestrator.config import load_recipe
from orchestrator.schema import ConfigError
from policy.parallelize import OptimConfig, lr_at

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def test_constant_holds_the_rate_after_the_warm_up() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, decay_steps=10)
    assert [lr_at(cfg, s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert lr_at(cfg, 10_000) == 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_starts_at_lr_after_warm_up_and_ends_at_the_floor(schedule: str) -> None:
    cfg = OptimConfig(lr=1e-3, schedule=schedule, warmup_steps=2, decay_steps=10, min_lr_ratio=0.1)  # type: ignore[arg-type]
    rates = [lr_at(cfg, s) for s in range(12)]
    assert rates[1] == pytest.approx(1e-3) and rates[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[2:])), rates  # never rises after the warm-up
    assert rates[10] == pytest.approx(1e-4) and rates[11] == pytest.approx(1e-4)  # held at the floor
    assert rates[6] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway: cosine and linear agree
    quarter = 0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine" else 0.75
    assert rates[4] == pytest.approx(1e-4 + 0.9e-3 * quarter)


def test_recipe_fills_decay_steps_from_run_steps_and_keeps_an_explicit_one() -> None:
    cfg = load_recipe(TINY, overrides=["learner.optim.schedule=cosine", "run.steps=30"])
    assert cfg.learner.optim.decay_steps == 30
    cfg = load_recipe(TINY, overrides=["learner.optim.decay_steps=7", "run.steps=30"])
    assert cfg.learner.optim.decay_steps == 7


def test_warm_up_longer_than_the_decay_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"learner\.optim\.warmup_steps: 30 leaves nothing"):
        load_recipe(
            TINY, overrides=["learner.optim.schedule=linear", "learner.optim.warmup_steps=30", "run.steps=30"]
        )


def test_a_decay_without_its_length_is_refused_not_collapsed_to_the_floor() -> None:
    with pytest.raises(ValueError, match=r"cosine schedule needs decay_steps > warmup_steps, got 0"):
        lr_at(OptimConfig(lr=1e-3, schedule="cosine"), 5)
