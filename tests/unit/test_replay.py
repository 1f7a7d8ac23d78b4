"""Best-sample replay (orchestrator/replay.py): what is admitted, kept, drawn, saved; the learner's
loss_weight; the recipe checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.records import Rewards, Rollouts, TrainBatch
from orchestrator.config import load_recipe
from orchestrator.replay import ReplayBuffer, ReplayConfig, replay_seed
from orchestrator.schema import ConfigError
from policy.selection import top_per_group

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _rollouts(
    scores: list[float], groups: list[int], ok: list[bool] | None = None
) -> tuple[Rollouts, Rewards]:
    n = len(scores)
    raw = torch.tensor(scores, dtype=torch.float32)
    roll = Rollouts(
        policy_version=3,
        precision="bf16",
        steps=2,
        prompts=[f"p{g}" for g in groups],
        group_ids=torch.tensor(groups),
        seeds=torch.arange(n),
        text=torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 4, 8).clone(),  # row i holds i
        text_mask=torch.ones(n, 4, dtype=torch.bool),
        latents=torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 4, 4).clone(),
        images=np.zeros((n, 8, 8, 3), np.uint8),
    )
    okt = torch.tensor(ok if ok is not None else [True] * n)
    rew = Rewards(total=(raw - raw.mean()) / raw.std(), per_scorer={"composition": raw}, ok=okt)
    return roll, rew


def _ids(batch_or_buffer: ReplayBuffer) -> list[int]:
    state = batch_or_buffer.state()
    x0 = state["x0"]
    return [] if x0 is None else [int(v) for v in x0[:, 0, 0, 0].tolist()]  # type: ignore[index]


def test_top_per_group_takes_the_best_k_above_the_bar_and_never_a_failed_item() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.95, 0.2, 0.8, 0.3])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ok = torch.tensor([True, True, True, True, False, True, True, True])
    assert top_per_group(scores, groups, ok, 2, -math.inf).tolist() == [1, 3, 6, 7]  # item 4 failed
    assert top_per_group(scores, groups, ok, 2, 0.75).tolist() == [1, 6]
    assert top_per_group(scores, groups, ok, 9, 0.0).tolist() == [1, 3, 2, 0, 6, 7, 5]
    assert top_per_group(scores, groups, torch.zeros(8, dtype=torch.bool), 2, 0.0).numel() == 0


def test_buffer_admits_the_best_per_group_and_forgets_the_oldest_first() -> None:
    buf = ReplayBuffer(ReplayConfig(weight=1.0, top_k=1, min_score=0.5, capacity=3), score="composition")
    roll, rew = _rollouts([0.2, 0.6, 0.9, 0.4, 0.3, 0.1], [0, 0, 1, 1, 2, 2])
    m = buf.admit(roll, rew)
    assert _ids(buf) == [1, 2] and m["replay/admitted"] == 2.0  # group 2's best (0.3) is under the bar
    assert m["replay/score"] == pytest.approx(0.75)
    roll2, rew2 = _rollouts([0.7, 0.8, 0.55, 0.1], [5, 5, 6, 6])
    buf.admit(roll2, rew2)
    assert _ids(buf) == [2, 1, 2]  # this call's sample 1 (0.8) and 2 (0.55); the first 1 left
    assert len(buf) == 3 and buf.admitted == 4
    bad = ReplayBuffer(ReplayConfig(weight=1.0, score="aesthetic"), score="composition")
    with pytest.raises(KeyError, match=r"rollout\.replay\.score: no reward named 'aesthetic'"):
        bad.admit(roll, rew)


def test_buffer_skips_failed_and_non_finite_scores() -> None:
    buf = ReplayBuffer(ReplayConfig(weight=1.0, top_k=2), score="composition")
    roll, rew = _rollouts([0.9, 0.8, 0.1, 0.2], [0, 0, 0, 0], ok=[False, True, True, True])
    rew.per_scorer["composition"][1] = float("nan")
    buf.admit(roll, rew)
    assert _ids(buf) == [3, 2]


def test_batch_is_seeded_weighted_and_splits_over_ranks() -> None:
    buf = ReplayBuffer(ReplayConfig(weight=2.5, top_k=4, batch_size=7), score="composition")
    assert buf.batch(seed=1, world=1) is None  # nothing admitted yet
    roll, rew = _rollouts([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0])
    buf.admit(roll, rew)
    a, b, c = buf.batch(seed=11, world=1), buf.batch(seed=11, world=1), buf.batch(seed=12, world=2)
    assert a is not None and b is not None and c is not None
    assert a.kind == "fm" and a.loss_weight == 2.5 and a.seed == 11 and len(a) == 7 and len(c) == 6
    assert torch.equal(a.x0, b.x0) and torch.equal(a.text, b.text)
    # each drawn sample keeps its own prompt embedding
    assert torch.equal(a.x0[:, 0, 0, 0], a.text[:, 0, 0])
    assert a.shard(0, 1).loss_weight == 2.5
    assert replay_seed(0, 1) != replay_seed(0, 2) != replay_seed(1, 2)
    # the replay-only updates of a step draw afresh, and never what another step's own update draws
    draws = {replay_seed(0, step, k) for step in range(1, 1001) for k in range(4)}
    assert len(draws) == 4000 and replay_seed(0, 1, 0) == replay_seed(0, 1)


def test_state_round_trips_through_torch_save(tmp_path: Path) -> None:
    cfg = ReplayConfig(weight=1.0, top_k=2, batch_size=5)
    buf = ReplayBuffer(cfg, score="composition")
    roll, rew = _rollouts([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 0, 0, 1, 1, 1])
    buf.admit(roll, rew)
    torch.save(buf.state(), tmp_path / "replay.pt")
    again = ReplayBuffer(cfg, score="composition")
    again.load_state(torch.load(tmp_path / "replay.pt"))
    assert _ids(again) == _ids(buf) and again.admitted == buf.admitted == 4
    x, y = buf.batch(seed=3, world=1), again.batch(seed=3, world=1)
    assert (
        x is not None and y is not None and torch.equal(x.x0, y.x0) and torch.equal(x.text_mask, y.text_mask)
    )
    again.clear()
    assert len(again) == 0 and again.batch(seed=3, world=1) is None
    torch.save(again.state(), tmp_path / "empty.pt")
    buf.load_state(torch.load(tmp_path / "empty.pt"))
    assert len(buf) == 0


def test_recipe_checks_name_the_field() -> None:
    cfg = load_recipe(RECIPES / "tiny.yaml", ["rollout.replay.weight=0.5", "rollout.replay.top_k=3"])
    assert cfg.rollout.replay.enabled and cfg.rollout.replay.top_k == 3
    with pytest.raises(ConfigError, match=r"rollout\.replay\.weight: replay trains beside NFT .* not grpo"):
        load_recipe(RECIPES / "tiny.yaml", ["rollout.replay.weight=1", "run.mode=grpo"])
    with pytest.raises(ConfigError, match=r"rollout\.replay\.score: no reward named 'clip'"):
        load_recipe(RECIPES / "tiny.yaml", ["rollout.replay.weight=1", "rollout.replay.score=clip"])
    with pytest.raises(ConfigError, match=r"rollout\.replay\.capacity: must be >= 1"):
        load_recipe(RECIPES / "tiny.yaml", ["rollout.replay.capacity=0"])


def test_learner_loss_weight_scales_the_gradients() -> None:
    import torch.distributed as dist

    from actors.learner import Learner, LearnerConfig
    from policy.losses import LossConfig
    from policy.parallelize import OptimConfig
    from policy.sana import ModelConfig

    learner = Learner(rank=0, world_size=1, num_threads=1)
    learner.init_distributed(*learner.open_rendezvous(), timeout_s=60)
    try:
        cfg = LearnerConfig(param_dtype="float32", micro_batch_size=2, optim=OptimConfig(lr=1e-3))
        learner.setup(ModelConfig(preset="tiny", overrides={"depth": 1}), cfg, LossConfig(), seed=0)
        g = torch.Generator().manual_seed(0)

        def grads(weight: float) -> list[torch.Tensor]:
            batch = TrainBatch(
                kind="fm", policy_version=-1, x0=torch.randn(4, 3, 16, 16, generator=g.manual_seed(1)),
                text=torch.randn(4, 6, 384, generator=g.manual_seed(2)), text_mask=torch.ones(4, 6, dtype=torch.bool),
                seed=5, loss_weight=weight,
            )  # fmt: skip
            metrics = learner.forward_backward(batch)
            out = [p.grad.detach().clone() for p in learner.params if p.grad is not None]
            learner.optimizer.zero_grad(set_to_none=True)
            assert math.isfinite(metrics["loss"])
            return out

        one, three = grads(1.0), grads(3.0)
        assert one and any(t.abs().sum() > 0 for t in one)
        for a, b in zip(one, three, strict=True):
            torch.testing.assert_close(b, 3 * a, rtol=1e-4, atol=1e-6)  # float32 rounding of 3 * loss
    finally:
        dist.destroy_process_group()
