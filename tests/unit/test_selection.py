"""Sol-RL seed selection and online DPO pairing."""

from __future__ import annotations

import torch

from policy.selection import best_worst_pairs, select_seeds


def _groups() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.0, 1.0, 0.4, 0.6, 0.8, 0.35])
    groups = torch.tensor([0] * 6 + [1] * 6)
    return rewards, groups, torch.ones(12, dtype=torch.bool)


def test_extremes_keeps_best_and_worst_per_group() -> None:
    r, g, ok = _groups()
    idx = select_seeds(r, g, ok, keep=4, how="extremes", generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == [0, 1, 4, 5, 6, 7, 10, 11]  # group 0: 0.9,0.7 best; 0.1,0.2 worst


def test_failed_items_are_never_selected_and_groups_keep_their_size() -> None:
    r, g, ok = _groups()
    ok[1] = False  # the best of group 0 failed to score
    for how in ("extremes", "random", "mean_deviation", "extremes_random"):
        idx = select_seeds(r, g, ok, keep=4, how=how, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
        assert 1 not in idx.tolist()
        assert (g[idx] == 0).sum() == 4 and (g[idx] == 1).sum() == 4


def test_random_selection_is_seeded() -> None:
    r, g, ok = _groups()
    a = select_seeds(r, g, ok, keep=3, how="random", generator=torch.Generator().manual_seed(5))
    b = select_seeds(r, g, ok, keep=3, how="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mean_deviation_prefers_outliers() -> None:
    r = torch.tensor([0.5, 0.51, 0.49, 0.0, 1.0, 0.52])
    g = torch.zeros(6, dtype=torch.int64)
    idx = select_seeds(
        r, g, torch.ones(6, dtype=torch.bool), keep=2, how="mean_deviation", generator=torch.Generator()
    )
    assert sorted(idx.tolist()) == [3, 4]


def test_best_worst_pairs_skip_flat_groups() -> None:
    r = torch.tensor([0.2, 0.8, 0.5, 0.4, 0.4, 0.4])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    win, lose = best_worst_pairs(r, g, torch.ones(6, dtype=torch.bool))
    assert win.tolist() == [1] and lose.tolist() == [0]
