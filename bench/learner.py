"""Learner step time and samples/s: 1 vs 2 ranks, with vs without activation checkpointing, LoRA vs full,
bf16 autocast vs float32 (CPU).

    sana-rl bench learner --quick   # CPU: tiny preset, 2 blocks, 16x16 latents (< 60 s)
    sana-rl bench learner           # CPU: tiny preset at 32x32; GPU: 0.6B at 32x32 latents (1024 px), bf16

One step is `forward_backward` + `optim_step` of the NFT objective (Sol-RL's) on a fixed batch: per
micro-batch the old-policy and reference forwards plus the trained forward and backward. Every
configuration is a LearnerGroup on the local Ray cluster (started here when none is connected); each
pair is timed interleaved (bench.harness.measure_pair) so machine noise hits both alike. The 2-rank row
keeps the global batch fixed, so its ratio is the data-parallel speed-up (strong scaling); on a GPU it
needs two GPUs. On a GPU the rows also carry model FLOPs utilisation (extra["mfu"]), counting 2·N·tokens
FLOPs per forward and 4·N·tokens per backward, N the parameters in linear layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from actors.learner import LearnerConfig
from actors.learner_group import LearnerGroup
from actors.records import TrainBatch
from bench.harness import Row, Timing, measure_pair, speed_row
from policy.lora import LoRAConfig
from policy.losses import LossConfig
from policy.sana import ModelConfig

SUITE = "learner"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}  # dense tensor-core FLOP/s


@dataclass(frozen=True, slots=True)
class Setup:
    model: ModelConfig
    side: int
    batch: int
    device: str
    note: str


def _setup(quick: bool) -> Setup:
    if torch.cuda.is_available():
        return Setup(ModelConfig(preset="0.6B"), 32, 8, "cuda", "0.6B, 32x32 latents (1024 px), bf16 compute")
    if quick:
        return Setup(
            ModelConfig(overrides={"depth": 2}), 16, 4, "cpu", "CPU, tiny preset with 2 blocks, 16x16"
        )
    return Setup(ModelConfig(), 32, 8, "cpu", "CPU, tiny preset, 32x32 pixels")


def _batch(s: Setup) -> TrainBatch:
    arch = s.model.arch()
    g = torch.Generator().manual_seed(0)
    return TrainBatch(
        kind="nft",
        policy_version=0,
        x0=torch.randn(s.batch, arch.in_channels, s.side, s.side, generator=g),
        text=torch.randn(s.batch, 32, arch.caption_channels, generator=g),
        text_mask=torch.ones(s.batch, 32, dtype=torch.bool),
        advantages=torch.randn(s.batch, generator=g),
        seed=1,
    )


def _group(s: Setup, world: int, cfg: LearnerConfig, name: str) -> LearnerGroup:
    gpus = 1.0 if s.device == "cuda" else 0.0
    return LearnerGroup(
        world_size=world, model_cfg=s.model, learner_cfg=cfg, loss_cfg=LossConfig(), seed=0,
        num_gpus_per_rank=gpus, name_prefix=f"bench-{name}",
    )  # fmt: skip


def _step(group: LearnerGroup, batch: TrainBatch) -> Callable[[], object]:
    def run() -> object:
        group.forward_backward(batch)
        return group.optim_step()

    return run


def _mfu(s: Setup, t: Timing) -> dict[str, float]:
    if s.device != "cuda":
        return {}
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    arch = s.model.arch()
    d, h = arch.hidden_size, int(arch.mlp_ratio * arch.hidden_size)
    # qkv, proj, cross q/kv/proj, Mix-FFN in/out per block (the depthwise conv is negligible)
    linear = arch.depth * (3 * d * d + d * d + d * d + 2 * d * d + d * d + d * 2 * h + h * d)
    tokens = s.batch * (s.side // arch.patch_size) ** 2
    flops = 2 * linear * tokens * 3 + 4 * linear * tokens  # old, ref and trained forwards; one backward
    achieved = flops / t.median_s
    return {"tflops": achieved / 1e12, **({"mfu": achieved / peak} if peak else {})}


def _row(s: Setup, case: str, ours: Timing, base: Timing, base_name: str, note: str) -> Row:
    row = speed_row(SUITE, case, ours, base, baseline_name=base_name, target=None)
    row.extra = {"samples_per_s": s.batch / ours.median_s, "baseline_samples_per_s": s.batch / base.median_s,
                 **_mfu(s, ours)}  # fmt: skip
    row.note = f"{s.note}; {note}"
    return row


def run(quick: bool) -> list[Row]:
    import ray

    from orchestrator.cluster import start_local

    started = not ray.is_initialized()
    if started:
        start_local(num_cpus=4)
    s = _setup(quick)
    batch = _batch(s)
    warmup, repeats = (1, 3) if quick else (2, 5)
    base_cfg = LearnerConfig(micro_batch_size=s.batch, num_threads=1 if s.device == "cpu" else 0)
    if s.device == "cpu":
        # bf16 parameters through FSDP's casts were no faster on a CPU; the autocast case measures bf16 products
        base_cfg = replace(base_cfg, param_dtype="float32")
    groups: list[LearnerGroup] = []

    def make(world: int, cfg: LearnerConfig, name: str) -> LearnerGroup:
        groups.append(_group(s, world, cfg, name))
        return groups[-1]

    rows: list[Row] = []
    try:
        full = make(1, base_cfg, "full")
        step_full = _step(full, batch)
        cases: list[tuple[str, Callable[[], LearnerGroup], str]] = [
            ("activation checkpointing", lambda: make(1, replace(base_cfg, activation_checkpointing=True), "ac"),
             "full fine-tune without AC; ratio < 1 is AC's recompute cost (it buys activation memory)"),
            ("LoRA r=32 (Sol-RL targets)", lambda: make(1, replace(base_cfg, lora=LoRAConfig(enabled=True)), "lora"),
             "full fine-tune; ratio > 1: LoRA's step is faster"),
        ]  # fmt: skip
        if s.device == "cpu":
            cases.append(("bf16 autocast (CPU)", lambda: make(1, replace(base_cfg, autocast="bfloat16"), "autocast"),
                          "full fine-tune in float32; ratio > 1 needs AVX512-BF16 or AMX and products large enough to pay the casts"))  # fmt: skip
        gpus = torch.cuda.device_count() if s.device == "cuda" else 2
        if gpus >= 2:
            cases.insert(0, ("2 ranks (same global batch)", lambda: make(2, base_cfg, "r2"),
                             "1 rank; ratio = data-parallel speed-up"))  # fmt: skip
        else:
            rows.append(Row(suite=SUITE, case="2 ranks", metric="ms (median)", value=float("nan"),
                            note="skipped: needs 2 GPUs"))  # fmt: skip
        for case, build, note in cases:
            group = build()
            ours, base = measure_pair(_step(group, batch), step_full, warmup=warmup, repeats=repeats)
            rows.append(_row(s, case, ours, base, "1 rank, full fine-tune", note))
            group.shutdown()  # frees its CPUs/GPUs for the next case
    finally:
        for g in groups:
            g.shutdown()
        if started:
            ray.shutdown()
    return rows


if __name__ == "__main__":
    for r in run(quick=True):
        print(r.case, f"{r.value:.1f} ms vs {r.baseline:.1f} ms", f"ratio {r.ratio:.2f}", r.extra)
