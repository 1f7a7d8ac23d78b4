"""Placement plans: bundles and names per role, colocation, feasibility errors naming the field, memory."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.placement import (
    Footprint,
    ResourcesConfig,
    check_feasible,
    describe,
    estimate_memory,
    make_plan,
    plan_for,
)
from orchestrator.schema import ConfigError, from_dict


def test_disaggregated_plan_has_one_bundle_per_actor_with_dashboard_names() -> None:
    res = ResourcesConfig(learner_ranks=2, learner_gpus=1, generators=3, generator_gpus=1, reward_gpus=0.25)
    plan = make_plan(res, generators=True, rewards=["hpsv2", "pick"])
    assert len(plan.bundles) == 2 + 3 + 2
    assert [a.name for a in plan.actors] == [
        "learner-rank0", "learner-rank1", "generator-0", "generator-1", "generator-2",
        "reward-hpsv2-0", "reward-pick-0",
    ]  # fmt: skip
    assert plan.indices("learner") == [0, 1] and plan.indices("generator") == [2, 3, 4]
    assert plan.slot("reward", 1).bundle == 6 and plan.bundles[6] == {"CPU": 0.5, "GPU": 0.25}
    assert plan.total("GPU") == 5.5


def test_sft_plan_starts_no_generators() -> None:
    plan = make_plan(ResourcesConfig(generators=4), generators=False, rewards=[])
    assert plan.indices("generator") == [] and len(plan.bundles) == 1


def test_colocated_plan_shares_a_bundle_and_splits_its_gpu() -> None:
    res = ResourcesConfig(learner_ranks=2, learner_gpus=1, generators=2, generator_gpus=1, colocate=True)
    plan = make_plan(res, generators=True, rewards=[])
    assert plan.bundles == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert plan.indices("learner") == plan.indices("generator") == [0, 1]
    assert {a.gpus for a in plan.actors} == {0.5}
    assert plan.total("GPU") == 2.0


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"colocate": True, "learner_ranks": 2, "generators": 1}, "resources.generators"),
        ({"colocate": True, "learner_gpus": 1.0, "generator_gpus": 0.5}, "resources.generator_gpus"),
        ({"reward_cpus": 0.0}, "resources.reward_cpus"),
        ({"learner_gpus": -1}, "resources.learner_gpus"),
        ({"strategy": "TIGHT"}, "resources.strategy"),
        ({"weight_sync": "collective", "learner_gpus": 1.0}, "resources.weight_sync"),
        (
            {"weight_sync": "collective", "colocate": True, "learner_gpus": 1.0, "generator_gpus": 1.0},
            "resources.weight_sync",
        ),
        ({"weight_sync": "nccl"}, "resources.weight_sync"),
        ({"weight_rendezvous_s": 0}, "resources.weight_rendezvous_s"),
    ],
)
def test_bad_resources_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        from_dict(ResourcesConfig, data, "resources")


def test_collective_weight_sync_picks_nccl_with_gpus_and_gloo_without() -> None:
    assert ResourcesConfig().weight_backend == "object_store"
    assert ResourcesConfig(weight_sync="collective").weight_backend == "gloo"
    gpus = ResourcesConfig(weight_sync="collective", learner_gpus=1, generator_gpus=1)
    assert gpus.weight_backend == "nccl"


def test_check_feasible_names_the_field_and_the_shortfall() -> None:
    plan = make_plan(ResourcesConfig(learner_ranks=8, learner_gpus=1), generators=False, rewards=[])
    with pytest.raises(ConfigError) as err:
        check_feasible(plan, {"CPU": 64.0})
    assert str(err.value) == "resources.learner_gpus: needs 8 GPUs (learner 8 x 1), cluster has 0"
    check_feasible(plan, {"CPU": 8.0, "GPU": 8.0})
    with pytest.raises(ConfigError, match=r"^resources.learner_cpus: needs 8 CPUs .* cluster has 4$"):
        check_feasible(plan, {"CPU": 4.0, "GPU": 8.0})


FP = Footprint(
    params=1_600_000_000, trainable=1_600_000_000, hidden=2240, depth=20, tokens=1024,
    weight_dtype="float32", compute_dtype="bfloat16", rollout_formats=["nvfp4", "bf16"],
    micro_batch=4, rollout_batch=24, checkpointing=False,
)  # fmt: skip


def test_memory_estimate_shards_over_ranks_and_shrinks_with_lora_and_checkpointing() -> None:
    one = estimate_memory(FP, ranks=1, generators=True)
    eight = estimate_memory(FP, ranks=8, generators=True)
    l1, l8 = one[0], eight[0]
    assert l1.role == "learner" and one[1].role == "generator"
    # fp32 masters + AdamW moments for 1.6B parameters: 6.4 GB + 12.8 GB, an eighth of it per rank at 8
    assert l1.optimizer == pytest.approx(2 * 1.6e9 * 4 / 2**30)
    assert l8.optimizer == pytest.approx(l1.optimizer / 8) and l8.grads == pytest.approx(l1.grads / 8)
    lora = estimate_memory(dataclasses.replace(FP, trainable=20_000_000), ranks=1, generators=False)
    assert len(lora) == 1 and lora[0].optimizer < l1.optimizer / 50 and lora[0].weights < l1.weights
    ckpt = estimate_memory(dataclasses.replace(FP, checkpointing=True), ranks=1, generators=False)[0]
    assert ckpt.activations < l1.activations / 5
    # the generator holds the fp32 policy plus its NVFP4 copy (4.5 bits a weight)
    assert one[1].weights == pytest.approx(1.6e9 * (4 + 0.5625) / 2**30)


def test_plan_for_a_1_6b_recipe_counts_its_parameters_and_describes_itself() -> None:
    from orchestrator.config import RunConfig

    cfg = from_dict(
        RunConfig,
        {
            "run": {"name": "t", "mode": "sol_rl"},
            "rewards": [{"name": "hps", "scorer": "hpsv2"}, {"name": "far", "scorer": "x", "address": "h:1"}],
            "model": {"preset": "1.6B", "dtype": "bfloat16"},
            "codec": {"image_codec": "dcae", "image_size": 1024},
            "resources": {"learner_ranks": 4, "learner_gpus": 1, "generators": 4, "generator_gpus": 1},
        },
    )
    plan = plan_for(cfg)
    assert [a.name for a in plan.actors if a.role == "reward"] == ["reward-hps-0"]  # 'far' has an address
    learner = plan.memory[0]
    params = learner.grads * 4 * 2**30 / 2  # bf16 grads of every parameter, sharded over 4 ranks
    assert 1.5e9 < params < 1.7e9
    text = describe(plan)
    assert "8 GPUs" in text and "generator-3" in text and "learner" in text.splitlines()[-2]
