"""When the learner wraps the policy in FSDP2: only when there is something to shard or to cast."""

from __future__ import annotations

import pytest

from policy.parallelize import needs_fsdp
from policy.sana import SanaConfig, SanaDiT


@pytest.fixture(scope="module")
def model() -> SanaDiT:
    return SanaDiT(SanaConfig.preset("tiny"))


def test_one_rank_computing_in_its_master_dtype_is_not_wrapped(model: SanaDiT) -> None:
    assert not needs_fsdp(model, 1, "float32")


def test_several_ranks_are_always_sharded(model: SanaDiT) -> None:
    assert needs_fsdp(model, 2, "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_one_rank_with_a_lower_compute_dtype_keeps_fsdp_mixed_precision(model: SanaDiT, dtype: str) -> None:
    assert needs_fsdp(model, 1, dtype)  # type: ignore[arg-type]
