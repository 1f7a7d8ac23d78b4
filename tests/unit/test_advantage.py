"""Group-relative advantages: hand-computed values, masking of flat groups and failed rewards."""

from __future__ import annotations

import math

import pytest
import torch

from policy.advantage import group_advantages


def test_group_std_and_zero_variance_mask() -> None:
    res = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1]), std="group")
    # group 0: mean 2, population std 1; group 1: all equal -> masked, advantage 0
    expected = [-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0.0, 0.0]
    assert res.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert res.mask.tolist() == [True, True, False, False]
    assert res.zero_var_fraction == 0.5
    assert res.advantages.dtype == torch.float32


def test_global_std_uses_group_means() -> None:
    res = group_advantages(torch.tensor([1.0, 3.0, 5.0, 9.0]), torch.tensor([7, 7, 42, 42]), std="global")
    std = math.sqrt(8.75)  # population std of all four rewards
    expected = [-1 / (std + 1e-4), 1 / (std + 1e-4), -2 / (std + 1e-4), 2 / (std + 1e-4)]
    assert res.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert res.mask.all()
    assert res.zero_var_fraction == 0.0


def test_failed_and_nonfinite_rewards_never_enter_the_baseline() -> None:
    res = group_advantages(
        torch.tensor([1.0, 100.0, 3.0]), torch.tensor([0, 0, 0]), ok=torch.tensor([True, False, True])
    )
    assert res.advantages.tolist() == pytest.approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)], abs=1e-6)
    assert res.mask.tolist() == [True, False, True]
    # a NaN reward, a not-ok item and single-item groups: nothing left to compare
    res = group_advantages(
        torch.tensor([1.0, float("nan"), 3.0, 5.0]),
        torch.tensor([0, 0, 0, 1]),
        ok=torch.tensor([True, True, False, True]),
    )
    assert not res.mask.any()
    assert torch.isfinite(res.advantages).all() and (res.advantages == 0).all()
    assert res.zero_var_fraction == 1.0


def test_advantages_sum_to_zero_per_group() -> None:
    torch.manual_seed(0)
    rewards = torch.randn(24)
    groups = torch.arange(6).repeat_interleave(4)
    res = group_advantages(rewards, groups, std="group")
    sums = torch.zeros(6).index_add_(0, groups, res.advantages)
    assert torch.allclose(sums, torch.zeros(6), atol=1e-5)
    per_group_std = res.advantages.view(6, 4).std(dim=1, unbiased=False)
    assert torch.allclose(per_group_std, torch.ones(6), atol=1e-3)


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), std="batch")  # type: ignore[arg-type]
