"""Fixtures shared by the fault suite and the collective-sync runs, which compare with the same run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import random_policy
from tests.integration.test_faults import uninterrupted


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fault runs' random tiny policy (one per session: `uninterrupted` makes it at the same path)."""
    return random_policy(tmp_path_factory.getbasetemp() / "fault-policy")


@pytest.fixture(scope="module")
def baseline(ray_cluster: object, policy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted fault run every fault and collective run is compared with."""
    return uninterrupted(tmp_path_factory)
