"""Where each role runs: Ray placement-group bundles from the recipe's `resources:` section.

One bundle per learner rank, per generator replica and per reward service. Colocated runs pack the
bundles onto as few nodes as possible (one CPU box, one 8-GPU node); disaggregated runs spread them.
The same recipe thus runs on a laptop (tiny preset) and on a cluster (real preset, more GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.schema import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


@dataclass(kw_only=True, slots=True)
class ResourcesConfig:
    """The recipe's `resources:` section: how many of each role, and what each one holds."""

    learner_ranks: int = field(default=1, metadata={"ge": 1})
    """FSDP2 ranks (one Ray actor each)."""
    learner_cpus: float = field(default=1.0, metadata={"ge": 0.0})
    learner_gpus: float = field(default=0.0, metadata={"ge": 0.0})
    generators: int = field(default=1, metadata={"ge": 1})
    """Rollout generator replicas (RL modes only)."""
    generator_cpus: float = field(default=1.0, metadata={"ge": 0.0})
    generator_gpus: float = field(default=0.0, metadata={"ge": 0.0})
    generator_threads: int = field(default=1, metadata={"ge": 1})
    """CPU intra-op threads per generator (CPU runs)."""
    reward_cpus: float = field(default=0.5, metadata={"ge": 0.0})
    """Per reward service the orchestrator launches (services given by address cost nothing here)."""
    reward_gpus: float = field(default=0.0, metadata={"ge": 0.0})
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy: PACK colocates roles, SPREAD disaggregates them across nodes."""
    timeout_s: float = field(default=120.0, metadata={"gt": 0.0})
    """How long to wait for the cluster to grant the bundles."""


@dataclass(kw_only=True, slots=True)
class PlacementPlan:
    """Bundles in order, which role owns which, and rough per-role memory."""

    bundles: list[dict[str, float]]
    roles: dict[str, list[int]]
    """role -> bundle indices ('learner', 'generator', 'reward')."""
    strategy: str
    memory_gb: dict[str, float]
    timeout_s: float

    def indices(self, role: str) -> list[int]:
        return self.roles.get(role, [])

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    b = {"CPU": cpus}
    if gpus:
        b["GPU"] = gpus
    return b


def memory_estimate(cfg: RunConfig) -> dict[str, float]:
    """GB per role: learner (params, grads, AdamW moments in fp32, sharded over ranks), generator
    (one full-precision copy plus the quantized copy). Activations are not counted."""
    arch = cfg.model.arch()
    d, depth = arch.hidden_size, arch.depth
    hidden = int(d * arch.mlp_ratio)
    per_block = 4 * d * d + 2 * d * d + 3 * d * hidden + 2 * hidden * 9 + 6 * d
    params = depth * per_block + arch.caption_channels * d + d * d + 256 * d + 7 * d * d
    width = 2 if cfg.model.dtype != "float32" else 4
    learner = params * (width + 4 + 8) / cfg.resources.learner_ranks / 1e9
    bits = {"bf16": 16.0, "fp8": 8.0, "nvfp4": 4.5, "w4a16": 4.5}[cfg.quant.fmt]
    generator = params * (width + bits / 8) / 1e9
    return {"params_billion": params / 1e9, "learner_per_rank": learner, "generator": generator}


def plan_for(cfg: RunConfig) -> PlacementPlan:
    """The placement a recipe asks for; started roles depend on the mode."""
    from orchestrator.config import RL_MODES

    res = cfg.resources
    bundles: list[dict[str, float]] = []
    roles: dict[str, list[int]] = {"learner": [], "generator": [], "reward": []}
    for _ in range(res.learner_ranks):
        roles["learner"].append(len(bundles))
        bundles.append(_bundle(res.learner_cpus, res.learner_gpus))
    if cfg.run.mode in RL_MODES:
        for _ in range(res.generators):
            roles["generator"].append(len(bundles))
            bundles.append(_bundle(res.generator_cpus, res.generator_gpus))
    for spec in cfg.rewards:
        if not (spec.address or spec.replicas):
            roles["reward"].append(len(bundles))
            bundles.append(_bundle(res.reward_cpus, res.reward_gpus))
    return PlacementPlan(
        bundles=bundles,
        roles=roles,
        strategy=res.strategy,
        memory_gb=memory_estimate(cfg),
        timeout_s=res.timeout_s,
    )


def check_feasible(plan: PlacementPlan, cluster: dict[str, float]) -> None:
    """Refuse a plan the cluster can never satisfy, naming the recipe field (exit 2 before any actor)."""
    need = plan.totals()
    fields = {"GPU": "resources.*_gpus", "CPU": "resources.*_cpus"}
    for key, amount in need.items():
        have = float(cluster.get(key, 0.0))
        if amount > have + 1e-9:
            raise ConfigError(
                f"{fields.get(key, key)}: the plan needs {amount:g} {key}, the cluster has {have:g}"
            )


def create_placement_group(plan: PlacementPlan) -> Any:
    """Reserve the bundles; a clear error when the cluster does not grant them in time."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(plan.bundles, strategy=plan.strategy, name="sana-rl")
    import ray

    ready, _ = ray.wait([pg.ready()], timeout=plan.timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement group of {plan.totals()} not granted within {plan.timeout_s:.0f} s "
            f"(cluster has {ray.available_resources()})"
        )
    return pg


def scheduling_strategy(plan: PlacementPlan, pg: Any, role: str, index: int) -> Any:
    """Actor option placing the index-th actor of a role in its bundle."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=plan.indices(role)[index]
    )


def describe(plan: PlacementPlan) -> str:
    """The plan as `--dry-run` prints it."""
    lines = [f"placement ({plan.strategy}), {len(plan.bundles)} bundles, total {plan.totals()}"]
    for role, idx in plan.roles.items():
        if idx:
            lines.append(f"  {role:<10} x{len(idx)}  bundle {plan.bundles[idx[0]]}")
    mem = plan.memory_gb
    lines.append(
        f"memory: {mem['params_billion']:.3f}B params; learner {mem['learner_per_rank']:.2f} GB/rank "
        f"(params+grads+AdamW, no activations); generator {mem['generator']:.2f} GB"
    )
    return "\n".join(lines)
