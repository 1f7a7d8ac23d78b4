"""Which K of the N stage-1 seeds of each prompt go on to stage 2 (Sol-RL, DESIGN.md section 5).

Sol-RL keeps the K/2 best and K/2 worst seeds by the cheap low-precision reward: the extremes carry the
largest advantages, which is where the learning signal is. The other rules exist to compare against it.
"""

from __future__ import annotations

from typing import Literal

import torch

Selection = Literal["extremes", "random", "mean_deviation", "extremes_random"]


def select_seeds(
    rewards: torch.Tensor,  # float32 [N] stage-1 rewards
    group_ids: torch.Tensor,  # int64 [N]
    ok: torch.Tensor,  # bool [N]; failed items are never selected
    keep: int,
    how: Selection,
    generator: torch.Generator,
) -> torch.Tensor:  # int64 [G*keep] indices into N, grouped, ordered by group id
    """Indices of the kept samples, `keep` per group (fewer only when a group has too few ok items)."""
    out: list[torch.Tensor] = []
    for g in torch.unique(group_ids, sorted=True):
        idx = torch.nonzero((group_ids == g) & ok).flatten()
        if idx.numel() <= keep:
            out.append(idx)
            continue
        r = rewards[idx]
        if how == "random":
            pick = torch.randperm(idx.numel(), generator=generator)[:keep]
        elif how == "mean_deviation":
            pick = torch.argsort((r - r.mean()).abs(), descending=True, stable=True)[:keep]
        else:
            order = torch.argsort(r, descending=True, stable=True)
            n_ext = keep if how == "extremes" else keep // 2
            top, bottom = (n_ext + 1) // 2, n_ext // 2
            chosen = torch.cat([order[:top], order[order.numel() - bottom :]]) if bottom else order[:top]
            if how == "extremes_random":
                rest = order[top : order.numel() - bottom]
                extra = rest[torch.randperm(rest.numel(), generator=generator)[: keep - n_ext]]
                chosen = torch.cat([chosen, extra])
            pick = chosen
        out.append(idx[torch.sort(pick).values])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def best_worst_pairs(
    rewards: torch.Tensor,  # float32 [N]
    group_ids: torch.Tensor,  # int64 [N]
    ok: torch.Tensor,  # bool [N]
) -> tuple[torch.Tensor, torch.Tensor]:  # int64 [P] winners, int64 [P] losers
    """Online Diffusion-DPO pairs: the best and the worst sample of each group with distinct rewards."""
    win: list[int] = []
    lose: list[int] = []
    for g in torch.unique(group_ids, sorted=True):
        idx = torch.nonzero((group_ids == g) & ok).flatten()
        if idx.numel() < 2:
            continue
        r = rewards[idx]
        hi, lo = int(torch.argmax(r)), int(torch.argmin(r))
        if r[hi] > r[lo]:
            win.append(int(idx[hi]))
            lose.append(int(idx[lo]))
    return torch.tensor(win, dtype=torch.int64), torch.tensor(lose, dtype=torch.int64)


def top_per_group(
    scores: torch.Tensor,  # float32 [N]
    group_ids: torch.Tensor,  # int64 [N]
    ok: torch.Tensor,  # bool [N]; failed items are never chosen
    k: int,
    min_score: float,
) -> torch.Tensor:  # int64 [<= G*k] indices into N, by group id, best first within a group
    """The up-to-k best samples of each group scoring at least `min_score` (best-sample replay)."""
    out: list[torch.Tensor] = []
    for g in torch.unique(group_ids, sorted=True):
        idx = torch.nonzero((group_ids == g) & ok).flatten()
        best = idx[torch.argsort(scores[idx], descending=True, stable=True)][:k]
        out.append(best[scores[best] >= min_score])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
