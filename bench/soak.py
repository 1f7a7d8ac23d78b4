"""Soak: a tiny asynchronous run while a generator and the reward service are killed at random intervals.

    python -m bench.soak --steps 60              # a few minutes on 2 CPU cores
    python -m bench.soak --steps 20 --kill-every 4 --seed 1

It reports the steps completed, the restarts (generator restarts seen by the pool, reward service
restarts caused), the rollouts lost (goal 0: every killed generation is regenerated, every reward call
retried, so each step trains on all `prompts_per_step * keep` items) and the memory of each role's
process over the run (goal flat: the growth between the first sample after warm-up and the last).

The same run is the `soak` bench suite's `run(quick)`; the fault tests (tests/integration/test_faults.py,
test_resume.py) share its tiny recipe settings and random-weight policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUITE = "soak"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
REWARD = "jpeg"
"""The reward of fault runs: JPEG size differs for any two images, so every group carries signal."""


def fault_overrides(run_dir: Path, policy: Path, *, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`--set` values that shrink recipes/tiny.yaml to a run of about a second per step on a CPU: Sol-RL
    two-stage (NVFP4 preview, BF16 final) on 2 prompts x 4 seeds, a checkpoint every step, tiny evals."""
    return [
        f"run.steps={steps}",
        "run.checkpoint_every=1",
        "run.init_recipe=null",
        "run.eval_every=0",
        "eval.num_prompts=1",
        "eval.seeds_per_prompt=2",
        "eval.steps=2",
        "logging.wandb=disabled",
        "logging.progress=false",
        "rollout.prompts_per_step=2",
        "rollout.num_seeds=4",
        "rollout.keep=2",
        "rollout.preview_steps=2",
        "rollout.final_steps=3",
        "learner.micro_batch_size=8",
        # one intra-op thread per actor: with two on a busy 2-core box, OpenMP barriers wait on
        # preempted threads and a 0.4 s rollout takes 5-10 s
        "resources.generator_threads=1",
        "learner.num_threads=1",
        f"rewards=[{{name: {REWARD}, scorer: jpeg_compressibility}}]",
        f"model.pretrained={policy}",
        f"run.output_dir={run_dir}",
        *extra,
    ]


def random_policy(path: Path) -> Path:
    """Save a tiny policy with every weight random at `path` (a fresh one has a zero final layer, which
    makes all samples alike and every group signal-free)."""
    import torch

    from policy.sana import ModelConfig, build_policy

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    model = build_policy(ModelConfig(preset="tiny", overrides={"patch_size": 4}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return path


def step_rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as {step: row} for trained or skipped steps; a step logged twice (a resumed or
    restored run repeats steps after its checkpoint) keeps its last row."""
    rows: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "learner/loss" in row or "skipped" in row:
            rows[int(row["step"])] = row
    return rows
