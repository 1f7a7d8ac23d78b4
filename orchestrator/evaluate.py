"""`sana-rl eval RUN_DIR`: a finished run's starting and final weights, evaluated again on a larger set.

A run evaluates itself on its recipe's `eval` section, sized to fit the run's time budget: the demo's 192
samples put a standard error of about 0.015 on its composition score (about 0.018 on the gain), and a
recipe tuned by those numbers was tuned on those very seeds. This evaluates both ends of the run again, through the same actor graph
(generators, reward services over gRPC), on the prompts and seeds asked for here: the same ones for both,
so each sample pairs with itself and the gain gets a paired standard error.

Example:
    sana-rl eval runs/tiny --seeds-per-prompt 32 --seed 5000
    # -> runs/tiny/eval-24x32-seed5000/{eval.json, samples/before.png, samples/after.png, rollouts/}
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import RunConfig, load_recipe
from orchestrator.launch import (
    BadInput,
    check_paths,
    connect_cluster,
    disconnect_cluster,
    init_weights,
    print_summary,
    rebase_paths,
)


@dataclass(frozen=True, slots=True)
class EvalRequest:
    """What to evaluate on; None keeps the run's own `eval` setting."""

    num_prompts: int | None = None
    seeds_per_prompt: int | None = None
    seed: int | None = None
    steps: int | None = None


@dataclass(frozen=True, slots=True)
class Gain:
    """One score's change over the run, from samples paired by (prompt, seed)."""

    before: float
    after: float
    stderr: float
    """Standard error of the mean per-sample difference."""
    samples: int


def evaluate_run(run_dir: Path, request: EvalRequest, out: Path | None = None) -> dict[str, Any]:
    """Evaluate the weights `run_dir` started from ("before") and its export ("after"); write eval.json."""
    cfg = _run_config(run_dir, request)
    final = init_weights(run_dir)
    start = cfg.model.pretrained  # None: the recipe's seeded initialisation, where the run began too
    steps_trained = _steps_trained(run_dir)
    ev = cfg.eval
    out = out or run_dir / f"eval-{ev.num_prompts}x{ev.seeds_per_prompt}-seed{ev.seed}"
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"--out: {out} is not empty; its pairs would mix with this evaluation's")
    out.mkdir(parents=True, exist_ok=True)
    cfg.run.output_dir = str(out)
    cfg.logging.wandb = "disabled"  # an evaluation is not a run of its own
    cfg.logging.progress = False
    t0 = time.perf_counter()
    connect_cluster(cfg)
    try:
        from orchestrator.controller import Controller

        for tag, weights, step in (("before", start, 0), ("after", str(final), steps_trained)):
            cfg.model.pretrained = weights
            check_paths(cfg)
            Controller(cfg, out).evaluate_once(tag, step)
    finally:
        disconnect_cluster(cfg)
    gains = paired_gains(out / "rollouts", before_step=0, after_step=steps_trained)
    result = {
        "run": str(run_dir),
        "before_weights": start,
        "after_weights": str(final),
        "eval": {"num_prompts": ev.num_prompts, "seeds_per_prompt": ev.seeds_per_prompt,
                 "seed": ev.seed, "steps": ev.steps},
        "gains": {k: asdict(g) for k, g in gains.items()},
        "wall_s": time.perf_counter() - t0,
    }  # fmt: skip
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    summary = {
        "before": {k: g.before for k, g in gains.items()},
        "after": {k: g.after for k, g in gains.items()},
        "steps": steps_trained,
        "wall_s": result["wall_s"],
    }
    outputs = "eval.json, samples/before.png, samples/after.png, rollouts/"
    print_summary(cfg, summary, out, outputs, random_start=start is None)
    for key, g in gains.items():
        print(
            f"{key}: {g.after - g.before:+.3f} +- {g.stderr:.3f} (paired standard error, {g.samples} samples)"
        )
    return result


def paired_gains(rollouts: Path, *, before_step: int, after_step: int) -> dict[str, Gain]:
    """Per score column of the evaluation rows: mean before, mean after and the paired standard error."""
    from orchestrator.rollout_log import read_rollout_log

    rows = [r for r in read_rollout_log(rollouts).to_pylist() if r["stage"] == "eval" and r["ok"]]
    by_step: dict[int, dict[tuple[str, int], dict[str, Any]]] = {before_step: {}, after_step: {}}
    for r in rows:
        if r["step"] in by_step:
            by_step[r["step"]][(r["prompt"], r["seed"])] = r
    before, after = by_step[before_step], by_step[after_step]
    keys = sorted(before.keys() & after.keys())
    if not keys:
        raise BadInput(f"{rollouts}: no evaluation samples scored both before and after")
    columns = [c for c in rows[0] if c.startswith("score/")]
    gains = {}
    for column in columns:
        b = np.array([before[k][column] for k in keys], dtype=np.float64)
        a = np.array([after[k][column] for k in keys], dtype=np.float64)
        diff = a - b
        stderr = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
        gains[column.removeprefix("score/")] = Gain(float(b.mean()), float(a.mean()), stderr, len(keys))
    return gains


def _run_config(run_dir: Path, request: EvalRequest) -> RunConfig:
    if (run_dir / "config.yaml").exists() and not (run_dir / "summary.json").exists():
        raise BadInput(f"RUN_DIR: {run_dir} has not finished (no summary.json); evaluate it when it has")
    overrides = ["run.init_recipe=null", "run.init_from=null"]  # the weights are named here
    for key in ("num_prompts", "seeds_per_prompt", "seed", "steps"):
        if (value := getattr(request, key)) is not None:
            overrides.append(f"eval.{key}={value}")
    return saved_config(run_dir, overrides)


def saved_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The config.yaml a run saved, with its relative paths made absolute so that it reads from any folder.

    They were saved relative to the folder the run started in: `run_dir` less its saved `run.output_dir`
    (runs/tiny in /work/main/runs/tiny: /work/main). A path not found there (a run directory copied or
    renamed since, an absolute output_dir) is taken from the current folder, as before.
    """
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise BadInput(f"RUN_DIR: {run_dir} holds no config.yaml; is it a run directory?")
    cfg = load_recipe(saved, overrides, base_dir=Path())  # relative paths stay relative: rebased below
    here, tail = run_dir.resolve(), cfg.output_dir.parts
    roots = [Path.cwd()]
    if tail and not cfg.output_dir.is_absolute() and ".." not in tail and here.parts[-len(tail) :] == tail:
        roots.insert(0, Path(*here.parts[: -len(tail)]))
    return rebase_paths(cfg, roots)


def _steps_trained(run_dir: Path) -> int:
    steps = json.loads((run_dir / "summary.json").read_text()).get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise BadInput(f"RUN_DIR: {run_dir}/summary.json has no step count")
    return steps


__all__ = ["EvalRequest", "Gain", "evaluate_run", "paired_gains", "saved_config"]
