"""The run configuration: one typed tree composed of each component's own Config, loaded from a recipe.

A recipe is a YAML file of values only. `load_recipe` is strict (see orchestrator/schema.py): an unknown
key, a wrong type or an out-of-range value fails naming the dotted path, before any actor starts.

    cfg = load_recipe("recipes/tiny.yaml", overrides=["learner.optim.lr=1e-5"])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from actors.learner import LearnerConfig
from kernels.quantize import Format, QuantConfig
from orchestrator.buffer import AsyncConfig
from orchestrator.cluster import ClusterConfig
from orchestrator.data import DataConfig
from orchestrator.metrics import LoggingConfig
from orchestrator.placement import ResourcesConfig
from orchestrator.replay import ReplayConfig
from orchestrator.schema import ConfigError, from_dict, set_path, to_dict
from policy.autocast import Autocast
from policy.codecs import CodecConfig
from policy.flow import SamplerConfig
from policy.losses import LossConfig
from policy.sana import ModelConfig
from rewards.client import RewardSpec

Mode = Literal["pretrain", "sft", "sol_rl", "grpo", "dpo"]
RL_MODES: tuple[str, ...] = ("sol_rl", "grpo", "dpo")


@dataclass(kw_only=True, slots=True)
class RunSection:
    """What the run is and how long it goes."""

    name: str
    mode: Mode
    output_dir: str | None = None
    """Run directory (checkpoints, metrics, samples); default runs/<name>. Relative to the working dir."""
    seed: int = 0
    steps: int = field(default=10, metadata={"ge": 1})
    """Optimizer steps (RL: one rollout-score-train round each)."""
    log_every: int = field(default=1, metadata={"ge": 1})
    eval_every: int = field(default=0, metadata={"ge": 0})
    """Evaluate every n steps (0: only before the first and after the last step)."""
    checkpoint_every: int = field(default=0, metadata={"ge": 0})
    """Checkpoint every n steps (0: only at the end)."""
    keep_checkpoints: int = field(default=2, metadata={"ge": 1})
    init_from: str | None = None
    """Start the policy from this run directory's latest checkpoint or a diffusers directory."""
    init_recipe: str | None = None
    """A recipe (path relative to this one) run first unless it has finished; this run starts from its
    result (its run directory becomes `init_from` when that is unset). The demo pretrains this way."""
    max_skip_rate: float = field(default=0.25, metadata={"ge": 0.0, "le": 1.0})
    """Stop with an error when this fraction of steps or items was skipped for non-finite values."""
    on_learner_failure: Literal["restore", "stop"] = "restore"
    """restore: reload all ranks from the last checkpoint and continue; stop: end with an error."""
    max_restores: int = field(default=2, metadata={"ge": 0})


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """Group sampling for RL. Sol-RL, naive scaling and DiffusionNFT are settings of one code path:
    stage 1 samples `num_seeds` per prompt with the preview copy, `keep` are selected, and stage 2
    regenerates those seeds with the final copy unless both stages are the same."""

    prompts_per_step: int = field(default=2, metadata={"ge": 1})
    num_seeds: int = field(default=8, metadata={"ge": 2})
    """N: seeds sampled per prompt in stage 1 (Sol-RL: 96)."""
    keep: int = field(default=4, metadata={"ge": 2})
    """K: seeds per prompt trained on (Sol-RL: 24)."""
    selection: Literal["extremes", "random", "mean_deviation", "extremes_random"] = "extremes"
    """How K of N are kept: best and worst halves, uniform, farthest from the group mean, or half
    extremes and half random."""
    preview_precision: Format = "nvfp4"
    preview_steps: int = field(default=6, metadata={"ge": 1})
    final_precision: Format = "bf16"
    final_steps: int = field(default=10, metadata={"ge": 1})
    compile: bool = False
    """torch.compile each rollout copy on its first use (compiled once per precision and image size, the
    batch size dynamic; synced weights are read in place). On an H200 the 1.6B rollout ran 1.4x (BF16) and 1.5x (FP8) eager BF16."""
    autocast: Autocast = "none"
    """CPU training rollouts: the policy's products in bf16 under torch.autocast, the sampler's state and
    attention's softmax in float32. `auto`: bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX), where
    regeneration ran 1.1-1.3x and 20-step sampling 1.8x; none elsewhere (policy/autocast.py). The emulated
    NVFP4/FP8 preview gains little (its time is the rounding). Evaluations always sample without it, so
    before/after are measured alike on every CPU."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Best-sample replay beside NFT (orchestrator/replay.py); off unless `replay.weight` > 0."""

    def validate(self) -> None:
        if self.keep > self.num_seeds:
            raise ValueError(f"keep: {self.keep} is more than num_seeds {self.num_seeds}")

    @property
    def two_stage(self) -> bool:
        return (self.preview_precision, self.preview_steps) != (self.final_precision, self.final_steps)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Evaluation on fixed prompts and seeds with the deterministic ODE."""

    num_prompts: int = field(default=8, metadata={"ge": 1})
    seeds_per_prompt: int = field(default=2, metadata={"ge": 1})
    steps: int = field(default=20, metadata={"ge": 1})
    seed: int = 1234


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """A whole run. Sections are the components' own Config classes."""

    run: RunSection
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: AsyncConfig = field(default_factory=AsyncConfig)
    """Synchronous or asynchronous execution and the staleness bound."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        if self.run.mode in RL_MODES and not self.rewards:
            raise ValueError(f"rewards: mode {self.run.mode} needs at least one reward")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: names must be unique, got {names}")
        replay = self.rollout.replay
        if replay.enabled and self.run.mode != "sol_rl":
            raise ValueError(
                f"rollout.replay.weight: replay trains beside NFT (mode sol_rl), not {self.run.mode};"
                " set rollout.replay.weight=0 to turn it off"
            )
        if replay.enabled and replay.score and replay.score not in names:
            raise ValueError(f"rollout.replay.score: no reward named {replay.score!r} (rewards: {names})")

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")


def load_recipe(
    path: str | os.PathLike[str], overrides: list[str] | None = None, base_dir: Path | None = None
) -> RunConfig:
    """Read a recipe strictly; `overrides` are `dotted.key=yaml-value` strings applied first.

    Relative data and weight paths in the recipe are resolved against `base_dir`, by default the recipe's
    folder. (A run's saved config.yaml holds them already resolved, relative to where the run started.)
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        set_path(data, key.strip(), raw)
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.data.resolve(path.parent if base_dir is None else base_dir)
    optim = cfg.learner.optim
    if optim.decay_steps == 0:  # the schedule spans the run unless the recipe says otherwise
        optim.decay_steps = cfg.run.steps
    if optim.schedule != "constant" and optim.warmup_steps >= optim.decay_steps:
        raise ConfigError(
            f"{path}: learner.optim.warmup_steps: {optim.warmup_steps} leaves nothing of the {optim.schedule} "
            f"decay over decay_steps={optim.decay_steps}"
        )
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, with secrets redacted (saved in the run directory)."""
    from orchestrator.metrics import redact

    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)
