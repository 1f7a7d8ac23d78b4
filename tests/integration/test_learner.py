"""Learner ranks on a local Ray cluster (CPU, gloo, FSDP2) with the tiny preset."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from actors.learner import LearnerConfig
from actors.learner_group import LearnerFailed, LearnerGroup
from actors.records import TrainBatch
from policy.checkpoint import latest_complete
from policy.flow import shifted_sigmas
from policy.lora import LoRAConfig
from policy.losses import LossConfig, NFTConfig
from policy.parallelize import OptimConfig
from policy.sana import ModelConfig, SanaDiT

pytestmark = pytest.mark.ray

MODEL = ModelConfig(preset="tiny", overrides={"depth": 2})


def _config(**kw: object) -> LearnerConfig:
    base: dict[str, object] = {
        "param_dtype": "float32", "micro_batch_size": 2, "num_threads": 1, "timeout_s": 60.0,
        "optim": OptimConfig(lr=1e-3),
    }  # fmt: skip
    base.update(kw)
    return LearnerConfig(**base)  # type: ignore[arg-type]


def _batch(kind: str, seed: int, b: int = 4, *, nan: bool = False) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 16, 16, generator=g)
    if nan:
        x0[0, 0, 0, 0] = float("nan")
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[:, 4:] = False
    return TrainBatch(
        kind=kind,  # type: ignore[arg-type]
        policy_version=0,
        x0=x0,
        text=torch.randn(b, 6, 384, generator=g),
        text_mask=mask,
        advantages=torch.randn(b, generator=g),
        seed=seed,
    )


def _assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def groups(ray_cluster: object) -> Iterator[tuple[LearnerGroup, LearnerGroup]]:
    # A warm-up and a decay: resuming must continue the schedule from the checkpoint's version.
    cfg = _config(
        optim=OptimConfig(lr=1e-3, schedule="linear", warmup_steps=2, decay_steps=4, min_lr_ratio=0.5)
    )
    g2 = LearnerGroup(
        world_size=2, model_cfg=MODEL, learner_cfg=cfg, loss_cfg=LossConfig(), seed=3, name_prefix="t2"
    )
    g1 = LearnerGroup(
        world_size=1, model_cfg=MODEL, learner_cfg=cfg, loss_cfg=LossConfig(), seed=3, name_prefix="t1"
    )
    yield g2, g1
    g2.shutdown()
    g1.shutdown()


def test_two_ranks_match_one_rank_and_resume_exactly(
    groups: tuple[LearnerGroup, LearnerGroup], tmp_path: Path
) -> None:
    g2, g1 = groups
    start = g2.state_for_rollout()
    _assert_states_close(start.state, g1.state_for_rollout().state, atol=0.0)  # same seed, same init
    for step in range(2):
        batch = _batch("nft", seed=10 + step)
        per_rank = g2._call("forward_backward", batch)  # every rank reports the rank-averaged metrics
        assert per_rank[0] == per_rank[1]
        m1 = g1.forward_backward(batch)
        assert torch.isfinite(torch.tensor(per_rank[0]["loss"]))
        assert per_rank[0]["loss"] == pytest.approx(m1["loss"], rel=1e-5)
        v2, om2 = g2.optim_step()
        v1, _ = g1.optim_step()
        assert v2 == v1 == step + 1
        assert om2["lr"] == pytest.approx([5e-4, 1e-3][step])  # the warm-up's ramp
    assert g2._call("counters")[0] == g2._call("counters")[1]
    snap2, snap1 = g2.state_for_rollout(), g1.state_for_rollout()
    assert snap2.policy_version == 2
    _assert_states_close(snap2.state, snap1.state, atol=1e-5)
    moved = [k for k in start.state if not torch.equal(start.state[k], snap2.state[k])]
    assert "blocks.0.attn.qkv.weight" in moved and "final_layer.linear.weight" in moved

    # save, step, load, step again: identical to the bit
    g2.save(str(tmp_path / "step-0000002"))
    assert latest_complete(tmp_path) == tmp_path / "step-0000002"
    third = _batch("nft", seed=12)
    loss3 = g2.forward_backward(third)["loss"]
    g2.optim_step()
    after3 = g2.state_for_rollout().state
    assert g2.load(str(tmp_path / "step-0000002")) == 2
    assert g2.forward_backward(third)["loss"] == loss3
    version, om = g2.optim_step()
    assert version == 3 and om["lr"] == pytest.approx(1e-3)  # a schedule restarted at 0 would say 5e-4
    resumed = g2.state_for_rollout().state
    assert all(torch.equal(after3[k], resumed[k]) for k in after3)

    # the 2-rank checkpoint loads on 1 rank (DCP reshards) and continues the same run
    assert g1.load(str(tmp_path / "step-0000002")) == 2
    assert g1.forward_backward(third)["loss"] == pytest.approx(loss3, rel=1e-5)
    g1.optim_step()
    _assert_states_close(g1.state_for_rollout().state, after3, atol=1e-5)

    # and back: the single rank trains unsharded (nothing to shard or cast), yet its checkpoint loads
    # into the 2 FSDP2 ranks and both continue alike
    g1.save(str(tmp_path / "one-rank"))
    assert g2.load(str(tmp_path / "one-rank")) == 3
    fourth = _batch("nft", seed=13)
    assert g2.forward_backward(fourth)["loss"] == pytest.approx(g1.forward_backward(fourth)["loss"], rel=1e-5)
    g2.optim_step()
    g1.optim_step()
    _assert_states_close(g2.state_for_rollout().state, g1.state_for_rollout().state, atol=1e-5)


def test_rank0_publishes_its_rollout_weights_into_the_object_store_itself(
    groups: tuple[LearnerGroup, LearnerGroup],
) -> None:
    """The controller receives a ref, not the weights (at 1.6B, 3.2 GB it no longer relays per sync)."""
    import pickle

    import ray

    from actors.generator import state_digest

    g2, _ = groups
    published = g2.publish_for_rollout()
    snap = g2.state_for_rollout()
    assert len(pickle.dumps(published)) < 4096  # the ref and three numbers travel, no tensor
    assert published.version == snap.policy_version
    got = ray.get(published.ref)
    _assert_states_close(got.state, snap.state, atol=0.0)
    assert published.nbytes == sum(t.numel() * t.element_size() for t in snap.state.values())
    assert g2.rollout_digest() == (snap.policy_version, state_digest(snap.state))


def test_nonfinite_step_is_skipped_and_counted(groups: tuple[LearnerGroup, LearnerGroup]) -> None:
    g2, _ = groups
    before_version = g2.counters()["version"]
    before = g2.state_for_rollout().state
    metrics = g2.forward_backward(_batch("nft", seed=20, nan=True))
    assert metrics["nonfinite_loss"] == 1.0
    version, step = g2.optim_step()
    assert version == before_version and step["skipped"] == 1.0 and step["skipped_steps"] >= 1.0
    after = g2.state_for_rollout().state
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the next clean step trains normally
    g2.forward_backward(_batch("nft", seed=21))
    assert g2.optim_step()[0] == before_version + 1


def test_update_within_a_round_moves_the_weights_and_keeps_the_version(
    groups: tuple[LearnerGroup, LearnerGroup],
) -> None:
    """optim_step(advance=False) (best-sample replay's further updates): the weights and NFT's old policy
    move, the version does not; the next ordinary step advances it by one."""
    g2, _ = groups
    g2.forward_backward(_batch("nft", seed=40))  # NFT's old policy exists from here on
    version = g2.optim_step()[0]
    before = g2.state_for_rollout().state  # under NFT the generators get the old policy
    g2.forward_backward(_batch("fm", seed=41))
    got, step = g2.optim_step(advance=False)
    assert got == version == g2.counters()["version"] and step["skipped"] == 0.0
    after = g2.state_for_rollout().state
    assert any(not torch.equal(before[k], after[k]) for k in before), "the old policy did not follow"
    g2.forward_backward(_batch("nft", seed=42))
    assert g2.optim_step()[0] == version + 1


def test_one_rank_hands_the_generators_the_old_policy(ray_cluster: object, tmp_path: Path) -> None:
    """One float32 rank (the demo's learner) runs without FSDP, so its state dict aliases the parameters:
    the old policy must be copied while it is swapped in, not after the trained weights are back."""
    loss_cfg = LossConfig(nft=NFTConfig(decay_rate=0.5))  # old = 0.5·θ0 + 0.5·θ1 after the first update
    group = LearnerGroup(world_size=1, model_cfg=MODEL, learner_cfg=_config(), loss_cfg=loss_cfg, seed=5,
                         name_prefix="old1")  # fmt: skip
    try:
        start = group.state_for_rollout().state
        group.forward_backward(_batch("nft", seed=50))
        group.optim_step()
        trained = SanaDiT.from_pretrained(group.export_diffusers(str(tmp_path / "export"))).state_dict()
        rollout = group.state_for_rollout().state
        moved = [k for k in start if not torch.equal(start[k], trained[k])]
        assert moved and all(not torch.equal(rollout[k], trained[k]) for k in moved)
        _assert_states_close(rollout, {k: 0.5 * start[k] + 0.5 * trained[k] for k in start}, atol=1e-6)
    finally:
        group.shutdown()


def test_dead_rank_raises_learner_failed_then_restores(
    groups: tuple[LearnerGroup, LearnerGroup], tmp_path: Path
) -> None:
    g2, _ = groups
    g2.save(str(tmp_path / "ck"))
    version = g2.counters()["version"]
    reference = g2.state_for_rollout().state
    os.kill(g2.pids()[1], signal.SIGKILL)
    with pytest.raises(LearnerFailed, match="learner-rank1"):
        g2.forward_backward(_batch("nft", seed=30))
    g2.restart()
    assert g2.load(str(tmp_path / "ck")) == version
    _assert_states_close(g2.state_for_rollout().state, reference, atol=0.0)
    g2.forward_backward(_batch("nft", seed=31))
    assert g2.optim_step()[0] == version + 1


def test_sft_lowers_fm_loss_exports_then_dpo_and_grpo_train(ray_cluster: object, tmp_path: Path) -> None:
    group = LearnerGroup(world_size=1, model_cfg=MODEL, learner_cfg=_config(), loss_cfg=LossConfig(), seed=0,
                         name_prefix="sft")  # fmt: skip
    try:
        # a tiny "dataset": four flat colours; the same σ/ε each step so the losses compare directly
        colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
        batch = _batch("fm", seed=5)
        batch.x0 = colours[:, :, None, None].expand(4, 3, 16, 16).clone()
        losses = []
        for _ in range(12):
            losses.append(group.forward_backward(batch)["loss"])
            group.optim_step()
        assert losses[-1] < 0.7 * losses[0], losses
        snap = group.state_for_rollout()
        out = group.export_diffusers(str(tmp_path / "export"))
        loaded = SanaDiT.from_pretrained(out)
        _assert_states_close(loaded.state_dict(), snap.state, atol=0.0)

        # RL after SFT: the reference is the policy as RL starts, so DPO's first loss is exactly log 2
        dpo = _batch("dpo", seed=6)
        dpo.x0_rejected = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        first = group.forward_backward(dpo)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["dpo_accuracy"] == 0.0
        group.optim_step()
        assert group.forward_backward(dpo)["dpo_accuracy"] > 0.5  # trained toward the preferred samples
        group.optim_step()

        grpo = _batch("grpo", seed=8)
        g = torch.Generator().manual_seed(9)
        grpo.sigmas = shifted_sigmas(3, 3.0)
        grpo.trajectory = torch.randn(4, 4, 3, 16, 16, generator=g)
        grpo.log_probs = torch.randn(4, 3, generator=g) * 0.01
        grpo.train_steps = torch.tensor([0, 2])
        m = group.forward_backward(grpo)
        assert math.isfinite(m["loss"]) and {"kl", "is_weight", "rollout_logp_mismatch"} <= m.keys()
        assert group.optim_step()[1]["skipped"] == 0.0
    finally:
        group.shutdown()


def test_lora_adafactor_trains_adapters_snapshots_merged_and_resumes(
    ray_cluster: object, tmp_path: Path
) -> None:
    # LoRA adapts a pretrained model; a fresh one outputs zeros (zero final layer), so no adapter would learn
    torch.manual_seed(0)
    pretrained = SanaDiT(MODEL.arch())
    torch.nn.init.normal_(pretrained.final_layer.linear.weight, std=0.02)
    pretrained.save_pretrained(tmp_path / "base")
    model_cfg = ModelConfig(preset="tiny", overrides={"depth": 2}, pretrained=str(tmp_path / "base"))
    cfg = _config(
        lora=LoRAConfig(enabled=True, rank=4, alpha=8), optim=OptimConfig(kind="adafactor", lr=1e-2)
    )
    group = LearnerGroup(world_size=2, model_cfg=model_cfg, learner_cfg=cfg, loss_cfg=LossConfig(), seed=0,
                         name_prefix="lora")  # fmt: skip
    try:
        base = group.state_for_rollout().state
        _assert_states_close(base, pretrained.state_dict(), atol=0.0)  # B = 0: merged = the base model
        assert group.trainable_params < sum(v.numel() for v in base.values()) // 5
        for seed in (1, 2):
            group.forward_backward(_batch("nft", seed=seed))
            group.optim_step()
        merged = group.state_for_rollout().state
        changed = {k for k in base if not torch.equal(base[k], merged[k])}
        assert "blocks.0.attn.qkv.weight" in changed and "blocks.1.cross_attn.kv_linear.weight" in changed
        assert not any(".mlp." in k or "final_layer" in k for k in changed)  # only adapted layers move
        # adapter, old/ref adapter slots and the factored optimizer state survive a checkpoint exactly
        group.save(str(tmp_path / "ck"))
        third = _batch("nft", seed=3)
        loss = group.forward_backward(third)["loss"]
        group.optim_step()
        after = group.state_for_rollout().state
        group.load(str(tmp_path / "ck"))
        assert group.forward_backward(third)["loss"] == loss
        group.optim_step()
        assert all(torch.equal(after[k], v) for k, v in group.state_for_rollout().state.items())
    finally:
        group.shutdown()
