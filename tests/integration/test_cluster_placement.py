"""Placement groups on the local cluster: actors land in their bundles; an ungrantable plan fails clearly."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.placement import ResourcesConfig, actor_options, create_placement_group, make_plan
from orchestrator.schema import ConfigError


@pytest.mark.ray
def test_actors_run_in_their_bundles_under_their_names(ray_cluster: dict[str, Any]) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    res = ResourcesConfig(learner_cpus=0.1, generators=2, generator_cpus=0.1, reward_cpus=0.1)
    plan = make_plan(res, generators=True, rewards=["jpeg"])
    pg = create_placement_group(plan)

    @ray.remote
    class Where:
        def bundle(self) -> tuple[str, str | None]:
            ctx = ray.get_runtime_context()
            return ctx.get_actor_name() or "", ctx.get_placement_group_id()

    try:
        opts = [actor_options(plan, pg, a.role, a.index) for a in plan.actors]
        actors = [Where.options(**o).remote() for o in opts]  # type: ignore[attr-defined]
        got = ray.get([a.bundle.remote() for a in actors], timeout=60)
        assert [name for name, _ in got] == ["learner-rank0", "generator-0", "generator-1", "reward-jpeg-0"]
        assert {group for _, group in got} == {pg.id.hex()}
        table = ray.util.placement_group_table(pg)
        assert table["bundles"][3] == {"CPU": 0.1} and table["state"] == "CREATED"
        for a in actors:
            ray.kill(a)
    finally:
        remove_placement_group(pg)


@pytest.mark.ray
def test_ungrantable_placement_fails_with_what_is_missing(ray_cluster: dict[str, Any]) -> None:
    import ray

    res = ResourcesConfig(learner_gpus=1.0, timeout_s=1.0)
    plan = make_plan(res, generators=False, rewards=[])
    with pytest.raises(ConfigError, match=r"^resources: placement group of 1 bundles .* 1 GPUs\) not ready"):
        create_placement_group(plan)
    mine = [
        g for g in ray.util.placement_group_table().values() if g["bundles"] == {0: {"CPU": 1.0, "GPU": 1.0}}
    ]
    assert mine and {g["state"] for g in mine} == {"REMOVED"}  # not left pending, holding a claim
