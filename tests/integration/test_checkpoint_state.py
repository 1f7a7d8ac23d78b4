"""The controller's part of a checkpoint (controller.json) holds what a resume needs and stays the same size
however long the run: every step's metrics row is in metrics.jsonl, not in each checkpoint."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_faults import BASELINE_STEPS, uninterrupted


def test_controller_state_does_not_grow_with_the_steps(
    ray_cluster: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = uninterrupted(tmp_path_factory)  # a checkpoint of each of its steps is kept
    files = sorted((run / "checkpoints").glob("step-*/controller.json"))
    assert len(files) == BASELINE_STEPS
    states = [json.loads(f.read_text()) for f in files]
    want = {"step", "version", "rng", "data", "rewards", "counters", "produced", "buffer"}
    assert all(set(s) == want for s in states), [sorted(s) for s in states]
    sizes = [f.stat().st_size for f in files]
    assert max(sizes) - min(sizes) < 256, sizes  # a metrics row per step would add about 1 KB each
