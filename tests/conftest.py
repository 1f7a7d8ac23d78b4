"""Shared fixtures: one local Ray cluster per test session (starting Ray costs ~4 s)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, object]]:
    """A local Ray cluster on loopback, shared by every test that asks for it."""
    import ray

    from orchestrator.cluster import start_local

    info = start_local(num_cpus=8)
    yield info
    ray.shutdown()
