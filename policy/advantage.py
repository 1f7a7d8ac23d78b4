"""Group-relative advantages (DESIGN.md section 4): one prompt sampled G times forms a group.

`A = (r - mean_group(r)) / (std + 1e-4)`, the std taken per group or over the whole batch (Sol-RL uses the
global std with per-group means). A group whose usable rewards are all equal carries no signal: its items
are masked and the fraction of such groups is reported, so a run can see when its reward saturates.
Items whose reward failed (`ok` False, or a non-finite value) never enter a mean or std: a failed reward
must not become a silent 0 that shifts its group's baseline (DESIGN.md section 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True, slots=True)
class AdvantageResult:
    """Advantages for N items; `mask` False marks items that must not be trained on."""

    advantages: torch.Tensor  # float32 [N]; 0 where mask is False
    mask: torch.Tensor  # bool [N]
    zero_var_fraction: float
    """Fraction of groups (with at least one usable item) whose usable rewards are all equal."""


def group_advantages(
    rewards: torch.Tensor,  # float [N]
    group_ids: torch.Tensor,  # int64 [N]
    std: Literal["group", "global"] = "group",
    ok: torch.Tensor | None = None,  # bool [N]
    *,
    eps: float = 1e-4,
) -> AdvantageResult:
    """Normalise rewards within their groups.

    >>> r = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1]))
    >>> r.advantages.tolist(), r.mask.tolist(), r.zero_var_fraction
    ([-0.99..., 0.99..., 0.0, 0.0], [True, True, False, False], 0.5)
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be [N]")
    if std not in ("group", "global"):
        raise ValueError(f"std: expected 'group' or 'global', got {std!r}")
    n = rewards.shape[0]
    r = rewards.detach().to(torch.float64)
    usable = torch.isfinite(r) if ok is None else ok.to(torch.bool) & torch.isfinite(r)  # bool [N]
    r = torch.where(usable, r, torch.zeros_like(r))
    _, gid = torch.unique(group_ids, return_inverse=True)  # int64 [N] dense ids 0..G-1
    groups = int(gid.max()) + 1 if n else 0
    w = usable.to(torch.float64)

    def per_group(values: torch.Tensor) -> torch.Tensor:  # float64 [N] -> [G] sums over usable items
        return torch.zeros(groups, dtype=torch.float64).index_add_(0, gid, values * w)

    count = per_group(torch.ones_like(r))  # [G]
    mean = per_group(r) / count.clamp(min=1)  # [G]
    centred = r - mean[gid]  # [N]
    # Exact equality, not a tolerance: equal rewards are common (binary or saturated scorers).
    big = torch.finfo(torch.float64).max
    fill = torch.where(usable, r, torch.full_like(r, -big))
    gmax = torch.full((groups,), -big, dtype=torch.float64).scatter_reduce_(0, gid, fill, "amax")
    fill = torch.where(usable, r, torch.full_like(r, big))
    gmin = torch.full((groups,), big, dtype=torch.float64).scatter_reduce_(0, gid, fill, "amin")
    live = count > 0  # [G] groups with at least one usable item
    flat = live & ((gmax == gmin) | (count < 2))  # [G]
    if std == "group":
        scale = (per_group(centred**2) / count.clamp(min=1)).sqrt()[gid]  # [N] population std of the group
    else:
        total = w.sum().clamp(min=1)
        global_mean = (r * w).sum() / total
        scale = (((r - global_mean) ** 2 * w).sum() / total).sqrt().expand(n)
    mask = usable & ~flat[gid]
    adv = torch.where(mask, centred / (scale + eps), torch.zeros_like(centred))
    n_live = int(live.sum())
    return AdvantageResult(
        advantages=adv.to(torch.float32),
        mask=mask,
        zero_var_fraction=float(flat.sum()) / n_live if n_live else 0.0,
    )


__all__ = ["AdvantageResult", "group_advantages"]
