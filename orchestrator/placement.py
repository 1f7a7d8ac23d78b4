"""Where every actor runs: the recipe's `resources:` section -> Ray placement group bundles -> actor options.

    plan = plan_for(cfg)                              # pure: bundles, named actors, memory estimate
    check_feasible(plan, ray.cluster_resources())     # ConfigError naming the field, before any actor
    pg = create_placement_group(plan)                 # waits for the bundles (clear error on timeout)
    Generator.options(**actor_options(plan, pg, "generator", 0)).remote(...)

Disaggregated (default): one bundle per learner rank, per generator replica and per launched reward
service. Colocated: learner rank i and generator i share bundle i (and its GPU: each asks for half), the
verl/OpenRLHF "hybrid engine" layout that keeps an 8-GPU node busy in both phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.schema import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import RunConfig

Role = Literal["learner", "generator", "reward"]
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
WeightSyncMode = Literal["object_store", "collective"]
GB = 1024**3
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
FORMAT_BYTES = {"bf16": 2.0, "fp8": 1.0, "w4a16": 0.52, "nvfp4": 0.5625}
"""Bytes per weight of a rollout copy; NVFP4 is 4 bits plus one E4M3 scale per 16 (4.5 bits)."""


@dataclass(kw_only=True, slots=True)
class ResourcesConfig:
    """The recipe's `resources:` section: how many actors of each role, what each asks Ray for, and how
    they are packed onto nodes."""

    learner_ranks: int = field(default=1, metadata={"ge": 1})
    """FSDP2 ranks of the learner (one Ray actor each)."""
    learner_cpus: float = field(default=1.0, metadata={"ge": 0.0})
    learner_gpus: float = field(default=0.0, metadata={"ge": 0.0})
    """GPUs per learner rank (0 on a CPU box)."""
    generators: int = field(default=1, metadata={"ge": 1})
    """Rollout generator replicas (RL modes only; SFT and pretraining start none)."""
    generator_cpus: float = field(default=1.0, metadata={"ge": 0.0})
    generator_gpus: float = field(default=0.0, metadata={"ge": 0.0})
    generator_threads: int = field(default=1, metadata={"ge": 1})
    """CPU intra-op threads per generator (CPU runs)."""
    reward_cpus: float = field(default=0.5, metadata={"ge": 0.0})
    """Per reward service the orchestrator launches (services given by address cost nothing here)."""
    reward_gpus: float = field(default=0.0, metadata={"ge": 0.0})
    colocate: bool = False
    """Learner rank i and generator i share one bundle and its GPU (needs generators == learner_ranks)."""
    strategy: Strategy = "PACK"
    """Ray placement strategy: PACK (fewest nodes), SPREAD (disaggregate across nodes), STRICT_PACK (one
    node), STRICT_SPREAD (one bundle per node)."""
    timeout_s: float = field(default=120.0, metadata={"gt": 0.0})
    """How long to wait for the cluster to grant the bundles before failing with what it lacks."""
    weight_sync: WeightSyncMode = "object_store"
    """How RL weights reach the generators: `object_store` (learner rank 0 puts one copy into Ray's object
    store, every generator reads it) or `collective` (learner rank 0 broadcasts to the generators in their
    own process group: NCCL when both roles have GPUs, gloo when neither has; the object store then only
    serves a generator that restarted between two syncs, from a CPU copy of the last broadcast that rank
    0 keeps, the size of the rollout weights)."""
    weight_rendezvous_s: float = field(default=30.0, metadata={"gt": 0.0})
    """Collective sync over gloo: how long the members of a new broadcast group wait for each other. A
    generator that dies in the instant between the controller's liveness check and its join is noticed
    after this (then the group is formed again with its restarted process); the broadcasts wait
    `learner.timeout_s`. NCCL forms its groups without waiting (the first broadcast connects them)."""

    def validate(self) -> None:
        for role in ("learner", "generator", "reward"):
            if getattr(self, f"{role}_cpus") == 0 and getattr(self, f"{role}_gpus") == 0:
                raise ValueError(f"{role}_cpus: a {role} must ask for some CPUs or GPUs")
        if self.colocate:
            if self.generators != self.learner_ranks:
                raise ValueError(
                    f"generators: colocate pairs generator i with learner rank i, so generators "
                    f"({self.generators}) must equal learner_ranks ({self.learner_ranks})"
                )
            if self.generator_gpus != self.learner_gpus:
                raise ValueError("generator_gpus: colocated generators share the learner's GPU; set it equal")
        if self.weight_sync == "collective":
            if (self.learner_gpus > 0) != (self.generator_gpus > 0):
                raise ValueError(
                    "weight_sync: collective needs learner_gpus and generator_gpus both > 0 (NCCL) or both 0 "
                    f"(gloo), got {self.learner_gpus} and {self.generator_gpus}; use object_store"
                )
            if self.colocate and self.learner_gpus > 0:
                raise ValueError(
                    "weight_sync: NCCL cannot broadcast between two processes on one GPU (colocate: true); "
                    "use object_store"
                )

    @property
    def weight_backend(self) -> Literal["object_store", "nccl", "gloo"]:
        """The WeightSync backend the run uses."""
        if self.weight_sync == "object_store":
            return "object_store"
        return "nccl" if self.learner_gpus > 0 else "gloo"


@dataclass(kw_only=True, slots=True)
class ActorSlot:
    """One named actor: the bundle it is pinned to and what it asks for inside that bundle."""

    name: str
    """Ray actor name, shown by the dashboard: learner-rank0, generator-1, reward-hpsv2-0."""
    role: Role
    index: int
    bundle: int
    cpus: float
    gpus: float


@dataclass(kw_only=True, slots=True)
class MemoryEstimate:
    """Rough memory per actor of a role (GiB): what must fit on one device."""

    role: Role
    weights: float
    """Parameters held (learner: its FSDP shard, the all-gathered block and old/ref slots)."""
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    note: str = ""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(kw_only=True, slots=True)
class Footprint:
    """What the memory estimate needs to know about the model and the batches."""

    params: int
    trainable: int
    """Parameters with gradients (LoRA: the adapters only)."""
    hidden: int
    depth: int
    tokens: int
    """Image tokens per sample (latent side / patch, squared)."""
    weight_dtype: str
    compute_dtype: str
    rollout_formats: list[str]
    micro_batch: int
    rollout_batch: int
    """Samples one generator call denoises at once."""
    checkpointing: bool


@dataclass(kw_only=True, slots=True)
class PlacementPlan:
    """Bundles in order, the named actor(s) pinned to each, and the memory each role needs."""

    bundles: list[dict[str, float]]
    strategy: Strategy
    actors: list[ActorSlot]
    memory: list[MemoryEstimate] = field(default_factory=list)
    timeout_s: float = 120.0

    def slot(self, role: Role, index: int) -> ActorSlot:
        for a in self.actors:
            if a.role == role and a.index == index:
                return a
        raise KeyError(f"no {role} {index} in the placement plan")

    def indices(self, role: Role) -> list[int]:
        """Bundle index of each actor of `role`, in actor order (LearnerGroup's `bundle_indices`)."""
        return [a.bundle for a in self.actors if a.role == role]

    def total(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for b in self.bundles)


def make_plan(
    res: ResourcesConfig, *, generators: bool, rewards: list[str], footprint: Footprint | None = None
) -> PlacementPlan:
    """The plan for `res`; `generators` False (SFT, pretraining) starts none; `rewards` are the names of
    reward services the orchestrator launches itself."""
    bundles: list[dict[str, float]] = []
    actors: list[ActorSlot] = []

    def bundle(cpus: float, gpus: float) -> int:
        bundles.append({k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0})
        return len(bundles) - 1

    def add(role: Role, index: int, name: str, cpus: float, gpus: float, at: int) -> None:
        actors.append(ActorSlot(name=name, role=role, index=index, bundle=at, cpus=cpus, gpus=gpus))

    n_gen = res.generators if generators else 0
    colocate = res.colocate and n_gen > 0
    for rank in range(res.learner_ranks):
        if colocate:  # one shared bundle; each of the two actors asks for half of its GPU
            at = bundle(res.learner_cpus + res.generator_cpus, res.learner_gpus)
            half = res.learner_gpus / 2
            add("learner", rank, f"learner-rank{rank}", res.learner_cpus, half, at)
            add("generator", rank, f"generator-{rank}", res.generator_cpus, half, at)
        else:
            at = bundle(res.learner_cpus, res.learner_gpus)
            add("learner", rank, f"learner-rank{rank}", res.learner_cpus, res.learner_gpus, at)
    for i in range(0 if colocate else n_gen):
        at = bundle(res.generator_cpus, res.generator_gpus)
        add("generator", i, f"generator-{i}", res.generator_cpus, res.generator_gpus, at)
    for i, name in enumerate(rewards):
        at = bundle(res.reward_cpus, res.reward_gpus)
        add("reward", i, f"reward-{name}-0", res.reward_cpus, res.reward_gpus, at)
    memory = estimate_memory(footprint, res.learner_ranks, n_gen > 0) if footprint else []
    return PlacementPlan(
        bundles=bundles, strategy=res.strategy, actors=actors, memory=memory, timeout_s=res.timeout_s
    )


def estimate_memory(fp: Footprint, ranks: int, generators: bool) -> list[MemoryEstimate]:
    """Rough per-actor memory: FSDP shards weights, grads and AdamW moments over the ranks; activations
    assume ~30 hidden-sized tensors kept per block and token (one block when checkpointing)."""
    w, c = DTYPE_BYTES[fp.weight_dtype], DTYPE_BYTES[fp.compute_dtype]
    act_elems = fp.micro_batch * fp.tokens * fp.hidden
    kept = fp.depth + 30 if fp.checkpointing else 30 * fp.depth
    learner = MemoryEstimate(
        role="learner",
        # shard + old/ref slots (trainable only) + one all-gathered block in the compute dtype
        weights=(fp.params * w + 2 * fp.trainable * w) / ranks / GB + fp.params / fp.depth * c / GB,
        grads=fp.trainable * w / ranks / GB,
        optimizer=2 * fp.trainable * w / ranks / GB,
        activations=act_elems * kept * c / GB,
    )
    out = [learner]
    if generators:
        copies = sum(FORMAT_BYTES.get(f, 2.0) for f in set(fp.rollout_formats) if f != "bf16")
        out.append(
            MemoryEstimate(
                role="generator",
                weights=fp.params * (w + copies) / GB,
                # no grads: a few live tensors per token, x2 for classifier-free guidance
                activations=2 * fp.rollout_batch * fp.tokens * fp.hidden * 10 * w / GB,
                note="plus text encoder and VAE",
            )
        )
    return out


def footprint_for(cfg: RunConfig) -> Footprint:
    """Parameter counts from the recipe's architecture, built on the meta device (no memory, no weights)."""
    import torch
    from torch import nn

    from policy.sana import SanaDiT

    arch = cfg.model.arch()
    with torch.device("meta"):
        model = SanaDiT(arch)
    params = sum(p.numel() for p in model.parameters())
    trainable = params
    lora = cfg.learner.lora
    if lora.enabled:
        trainable = sum(
            lora.rank * (m.in_features + m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name.endswith(t) for t in lora.target_modules)
        )
    downsample = 1 if cfg.codec.image_codec == "pixels" else 32
    side = cfg.codec.image_size // downsample // arch.patch_size
    ro = cfg.rollout
    return Footprint(
        params=params,
        trainable=trainable,
        hidden=arch.hidden_size,
        depth=arch.depth,
        tokens=side * side,
        weight_dtype=cfg.model.dtype,
        compute_dtype=cfg.learner.param_dtype,
        rollout_formats=[ro.preview_precision, ro.final_precision],
        micro_batch=cfg.learner.micro_batch_size,
        rollout_batch=max(1, ro.prompts_per_step * ro.num_seeds // max(1, cfg.resources.generators)),
        checkpointing=cfg.learner.activation_checkpointing,
    )


def plan_for(cfg: RunConfig) -> PlacementPlan:
    """The plan a recipe asks for: generators in RL modes only; a reward service for every reward without
    an address, in every mode (SFT and pretraining score their evaluations too)."""
    from orchestrator.config import RL_MODES

    launched = [r.name for r in cfg.rewards if not r.addresses]
    return make_plan(
        cfg.resources, generators=cfg.run.mode in RL_MODES, rewards=launched, footprint=footprint_for(cfg)
    )


def check_feasible(plan: PlacementPlan, cluster: dict[str, float]) -> None:
    """Raise ConfigError naming the recipe field when the cluster lacks CPUs or GPUs for the plan."""
    for resource, unit in (("GPU", "GPUs"), ("CPU", "CPUs")):
        need, have = plan.total(resource), float(cluster.get(resource, 0.0))
        if need <= have + 1e-9:
            continue
        roles = {a.role for a in plan.actors if (a.gpus if resource == "GPU" else a.cpus) > 0}
        blame = next(r for r in ("learner", "generator", "reward") if r in roles)
        key = f"resources.{blame}_{resource.lower()}s"
        parts = ", ".join(
            f"{r} {sum(1 for a in plan.actors if a.role == r)} x "
            f"{next(a.gpus if resource == 'GPU' else a.cpus for a in plan.actors if a.role == r):g}"
            for r in ("learner", "generator", "reward")
            if r in roles
        )
        raise ConfigError(f"{key}: needs {need:g} {unit} ({parts}), cluster has {have:g}")


def create_placement_group(plan: PlacementPlan) -> Any:
    """Reserve the plan's bundles and wait for them; ConfigError saying what is missing on timeout (the
    totals may fit while no node holds a bundle, or STRICT_PACK needs one node with everything)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(plan.bundles, strategy=plan.strategy, name="sana-rl")
    ready, _ = ray.wait([pg.ready()], timeout=plan.timeout_s)
    if not ready:
        remove_placement_group(pg)
        free = ray.available_resources()
        raise ConfigError(
            f"resources: placement group of {len(plan.bundles)} bundles ({plan.strategy}, "
            f"{plan.total('CPU'):g} CPUs, {plan.total('GPU'):g} GPUs) not ready after {plan.timeout_s:g} s; "
            f"free now: {free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs "
            f"(resources.timeout_s, resources.strategy)"
        ) from None
    return pg


def scheduling_strategy(plan: PlacementPlan, pg: Any, role: Role, index: int) -> Any:
    """A PlacementGroupSchedulingStrategy pinning actor (role, index) to its bundle of `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=plan.slot(role, index).bundle
    )


def actor_options(plan: PlacementPlan, pg: Any, role: Role, index: int) -> dict[str, Any]:
    """`.options(**...)` for actor (role, index): its dashboard name, its resources inside the bundle
    (colocated actors ask for half a GPU each) and the bundle itself."""
    slot = plan.slot(role, index)
    return {
        "name": slot.name,
        "num_cpus": slot.cpus,
        "num_gpus": slot.gpus,
        "scheduling_strategy": scheduling_strategy(plan, pg, role, index),
    }


def describe(plan: PlacementPlan) -> str:
    """Human-readable plan for `sana-rl run --dry-run`."""
    lines = [
        f"placement: {len(plan.bundles)} bundles, strategy {plan.strategy}, "
        f"{plan.total('CPU'):g} CPUs, {plan.total('GPU'):g} GPUs"
    ]
    for i, bundle in enumerate(plan.bundles):
        names = ", ".join(a.name for a in plan.actors if a.bundle == i)
        res = " ".join(f"{k}={v:g}" for k, v in bundle.items())
        lines.append(f"  bundle {i:>2} [{res}]: {names}")
    if plan.memory:
        lines.append("memory per actor (GiB, rough): weights + grads + optimizer + activations = total")
        for m in plan.memory:
            tail = f"  ({m.note})" if m.note else ""
            lines.append(
                f"  {m.role:<9} {_gib(m.weights)} + {_gib(m.grads)} + {_gib(m.optimizer)} + "
                f"{_gib(m.activations)} = {_gib(m.total)}{tail}"
            )
    return "\n".join(lines)


def _gib(x: float) -> str:
    return f"{x:.3g}" if x >= 0.01 or x == 0 else f"{x:.1e}"


__all__ = [
    "ActorSlot",
    "Footprint",
    "MemoryEstimate",
    "PlacementPlan",
    "ResourcesConfig",
    "actor_options",
    "check_feasible",
    "create_placement_group",
    "describe",
    "estimate_memory",
    "footprint_for",
    "make_plan",
    "plan_for",
    "scheduling_strategy",
]
