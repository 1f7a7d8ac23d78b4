"""`pipeline` suite: the tiny recipe's step time split into generate / score / learn / sync / idle, sync vs async.

Both runs use the same recipe, seed and random-weight policy on one embedded Ray cluster, one after the
other. Per step, the controller logs its wall time and the time of each stage; what is left is the
orchestration overhead (controller bookkeeping, object-store transfers, Ray scheduling, idle waits).

Targets (issue 11): overhead <= 10% of a synchronous step; an async step <= 1.15x the slowest stage.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from bench.harness import Row
from bench.soak import random_policy

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _stages(rows: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds per stage over the steps (the first step, with warm-up, is left out)."""
    steps = [r for r in rows if "time/step_s" in r][1:]

    def med(f: object) -> float:
        return statistics.median(f(r) for r in steps)  # type: ignore[operator]

    def score_of(r: dict[str, float]) -> float:
        return r.get("time/score_preview_s", 0.0) + r.get("time/score_final_s", 0.0)

    out = {
        "step": med(lambda r: r["time/step_s"]),
        "generate": med(lambda r: r["time/generate_s"]),
        "score": med(score_of),
        "learn": med(lambda r: r["time/learn_s"]),
        "sync": med(lambda r: r["time/sync_s"]),
    }
    # per step, then the median: stage medians come from different steps and need not add up
    out["overhead"] = med(
        lambda r: r["time/step_s"] - r["time/generate_s"] - score_of(r) - r["time/learn_s"] - r["time/sync_s"]
    )
    return out


def _run(root: Path, policy: Path, steps: int, async_: bool) -> dict[str, float]:
    from orchestrator.config import load_recipe
    from orchestrator.launch import launch

    out = root / ("async" if async_ else "sync")
    cfg = load_recipe(
        RECIPE,
        [
            f"run.steps={steps}", "run.init_recipe=null", "run.checkpoint_every=0", f"run.output_dir={out}",
            "eval.num_prompts=1", "eval.seeds_per_prompt=1", "eval.steps=2",
            "logging.wandb=disabled", "logging.progress=false", f"model.pretrained={policy}",
            "rewards=[{name: jpeg, scorer: jpeg_compressibility}]",
            f"pipeline.enabled={str(async_).lower()}", "pipeline.max_staleness=1",
        ],
    )  # fmt: skip
    launch(cfg, recipe=RECIPE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return _stages(rows)


def run(quick: bool) -> list[Row]:
    import ray

    from orchestrator.cluster import start_local

    steps = 5 if quick else 12
    started = not ray.is_initialized()
    if started:
        start_local(num_cpus=4)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            policy = random_policy(root / "policy")
            sync = _run(root, policy, steps, async_=False)
            asy = _run(root, policy, steps, async_=True)
    finally:
        if started:
            ray.shutdown()
    share = sync["overhead"] / sync["step"]
    slowest = max(sync["generate"] + sync["score"], sync["learn"] + sync["sync"])
    async_ratio = asy["step"] / slowest
    split = {f"{k}_s": v for k, v in sync.items()}
    return [
        Row(
            suite="pipeline", case=f"tiny sync, {steps} steps", metric="overhead share of a step",
            value=share, target="<= 0.10", met=share <= 0.10, extra=split,
            note="overhead = step - generate - score - learn - sync: the controller's own work (data, selection, advantages, batching); Ray dispatch counts in the stage it serves",
        ),
        Row(
            suite="pipeline", case=f"tiny async, {steps} steps", metric="s/step", value=asy["step"],
            baseline_name="slowest stage (sync run)", baseline=slowest, ratio=async_ratio,
            target="<= 1.15x", met=async_ratio <= 1.15, extra={f"{k}_s": v for k, v in asy.items()},
            note="ratio here is async step / slowest stage: lower is better",
        ),
        Row(
            suite="pipeline", case=f"tiny, {steps} steps", metric="async speed-up (sync s/step / async s/step)",
            value=sync["step"] / asy["step"], baseline_name="sync", baseline=sync["step"],
            ratio=sync["step"] / asy["step"],
        ),
    ]  # fmt: skip
