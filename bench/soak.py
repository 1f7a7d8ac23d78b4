"""Soak: a tiny asynchronous run while a generator and the reward service are killed at random intervals.

    python -m bench.soak --steps 60              # a few minutes on 2 CPU cores
    python -m bench.soak --steps 20 --kill-every 4 --seed 1

It reports the steps completed, the restarts (generator restarts seen by the pool, reward service
restarts caused), the rollouts lost (goal 0: every killed generation is regenerated, every reward call
retried, so each step trains on all `prompts_per_step * keep` items) and the memory of each role's
process (goal flat: at most 5% growth over the second half of the process's life).

The same run is the `soak` bench suite's `run(quick)`; the fault tests (tests/integration/test_faults.py,
test_resume.py) share its tiny recipe settings and random-weight policy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Row

SUITE = "soak"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
REWARD = "jpeg"
"""The reward of fault runs: JPEG size differs for any two images, so every group carries signal."""


SMALL_RL = (
    "rollout.prompts_per_step=2",
    "rollout.num_seeds=4",
    "rollout.keep=2",
    "rollout.preview_steps=2",
    "rollout.final_steps=3",
    "learner.micro_batch_size=8",
    "rollout.replay.batch_size=8",
)
"""The smallest RL step that still has groups to rank: what the soak, fault and end-to-end tests run."""


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
        *SMALL_RL,
        # one intra-op thread per actor: with two on a busy 2-core box, OpenMP barriers wait on
        # preempted threads and a 0.4 s rollout takes 5-10 s
        "resources.generator_threads=1",
        "learner.num_threads=1",
        # retry_budget_s (120 s) bounds the retries (max_attempts' default leaves that to it)
        f"rewards=[{{name: {REWARD}, scorer: jpeg_compressibility}}]",
        # JPEG scores sit under the demo's composition gate: admit them, so that fault runs carry a
        # non-empty replay buffer through their kills and resumes
        "rollout.replay.min_score=-.inf",
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


# ---------------------------------------------------------------------------------------------- the soak
ASYNC = (
    "pipeline.enabled=true",
    "pipeline.max_staleness=1",
    "pipeline.buffer_size=2",
    "run.checkpoint_every=5",
)
TRAINED_PER_STEP = 4
"""prompts_per_step x keep in fault_overrides: what each step trains on when nothing is lost."""
GENERATOR = "generator-0"
ROLES = ("driver", GENERATOR, "learner-rank0", f"reward-{REWARD}-0")
WARMUP_STEPS = 2
"""A process's memory growth is measured from this many steps after it appeared (caches, first sync)."""


@dataclass(kw_only=True, slots=True)
class SoakReport:
    """What a soak run survived and what it cost."""

    steps: int
    completed: int
    wall_s: float
    kills: dict[str, int]
    """Kills made per actor name (ray.kill or SIGKILL, picked at random)."""
    ray_restarts: dict[str, int]
    """Restarts Ray made per actor name (its actor table)."""
    pool_restarts: int
    """Generator restarts the rollout pool handled (reload, then regenerate or resume the sync)."""
    regenerated_groups: int
    rollouts_lost: int
    """Items whose reward failed plus the items a step trained on fewer than its groups with signal
    hold (TRAINED_PER_STEP less tied groups): goal 0."""
    stale_dropped: int
    rss_mb: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """Role -> RSS in MB of its longest-lived process: after warm-up, half way, at the end."""
    error: str = ""


def _alive_actors() -> dict[str, dict[str, Any]]:
    """Live named actors: name -> Ray's actor-table entry (Pid, NumRestarts). No public Ray API gives an
    actor's pid without calling the actor, which would queue behind its work."""
    from ray._private.state import actors

    return {a["Name"]: a for a in actors().values() if a["Name"] and a["State"] == "ALIVE"}


class Chaos(threading.Thread):
    """Kills the generator and the reward host in turn, at random intervals, with ray.kill or SIGKILL
    (at random), while the run trains (from step 1 until its last step is logged); samples every role's
    memory twice a second."""

    def __init__(self, run_dir: Path, *, steps: int, kill_every_s: float, seed: int) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.run_dir, self.steps, self.every = run_dir, steps, kill_every_s
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.kills: dict[str, int] = {GENERATOR: 0, ROLES[3]: 0}
        self.restarts: dict[str, int] = {}
        self.samples: dict[str, list[tuple[int, int, int]]] = {r: [] for r in ROLES}  # (step, pid, rss)
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            next_kill = time.monotonic() + self._interval()
            while not self.halt.wait(0.5):
                step = len(step_rows(self.run_dir)) if (self.run_dir / "metrics.jsonl").exists() else 0
                actors = _alive_actors()
                self._sample(step, actors)
                if 1 <= step < self.steps and time.monotonic() >= next_kill:
                    self._kill(actors)
                    next_kill = time.monotonic() + self._interval()
        except BaseException as exc:  # reported with the run's result
            self.failure = exc

    def _interval(self) -> float:
        return self.every * self.rng.uniform(0.5, 1.5)

    def _kill(self, actors: dict[str, dict[str, Any]]) -> None:
        import ray

        target = min(self.kills, key=lambda k: (self.kills[k], k))  # take turns, the generator first
        if target not in actors:  # restarting right now
            return
        if self.rng.random() < 0.5:
            os.kill(actors[target]["Pid"], signal.SIGKILL)
        else:
            ray.kill(ray.get_actor(target), no_restart=False)
        self.kills[target] += 1

    def _sample(self, step: int, actors: dict[str, dict[str, Any]]) -> None:
        import psutil

        pids = {"driver": os.getpid(), **{n: int(actors[n]["Pid"]) for n in ROLES[1:] if n in actors}}
        for name, pid in pids.items():
            try:
                self.samples[name].append((step, pid, psutil.Process(pid).memory_info().rss))
            except psutil.NoSuchProcess:
                continue
        for name in ROLES[1:]:
            if name in actors:
                self.restarts[name] = max(self.restarts.get(name, 0), int(actors[name]["NumRestarts"]))

    def rss_mb(self) -> dict[str, tuple[float, float, float]]:
        """Per role, RSS of its longest-lived process WARMUP_STEPS steps after it appeared (a restarted
        generator loads weights and caches before it settles), half way to its last sample, and last."""
        out = {}
        for role, samples in self.samples.items():
            born: dict[int, int] = {}
            for step, pid, _ in samples:
                born.setdefault(pid, step)
            late = [(pid, rss) for step, pid, rss in samples if step >= born[pid] + WARMUP_STEPS]
            if not late:
                continue
            pid = max({p for p, _ in late}, key=lambda p: sum(1 for q, _ in late if q == p))
            mine = [rss / 2**20 for p, rss in late if p == pid]
            out[role] = (mine[0], mine[len(mine) // 2], mine[-1])
        return out


def soak(steps: int, *, kill_every_s: float, seed: int = 0, workdir: Path | None = None) -> SoakReport:
    """Run the tiny asynchronous recipe for `steps` steps under Chaos; returns what happened."""
    import ray

    from orchestrator.cluster import connect
    from orchestrator.config import load_recipe
    from orchestrator.launch import launch

    root = workdir or Path(tempfile.mkdtemp(prefix="sana-soak-"))
    run_dir = root / "run"
    cfg = load_recipe(
        RECIPE, fault_overrides(run_dir, random_policy(root / "policy"), steps=steps, extra=ASYNC)
    )
    started = not ray.is_initialized()
    if started:
        connect(cfg.cluster)
    chaos = Chaos(run_dir, steps=steps, kill_every_s=kill_every_s, seed=seed)
    t0 = time.perf_counter()
    chaos.start()
    error = ""
    try:
        launch(cfg, recipe=RECIPE)
    except Exception as exc:  # the report says how far it got and why it stopped
        error = f"{type(exc).__name__}: {exc}"
    finally:
        chaos.halt.set()
        chaos.join()
        if started:
            ray.shutdown()
    if chaos.failure is not None:
        error = error or f"chaos thread: {chaos.failure!r}"
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    )
    rows = step_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
    counters = summary.get("counters", {})
    # a group whose samples tie (two JPEGs of one size) carries no signal: not lost to a fault
    signal_items = [round(TRAINED_PER_STEP * (1 - r.get("zero_var_fraction", 0.0))) for r in rows.values()]
    shortfall = sum(n - int(r.get("trained_items", 0)) for n, r in zip(signal_items, rows.values()))
    gen = summary.get("generator", {})
    return SoakReport(
        steps=steps,
        completed=len(rows),
        wall_s=time.perf_counter() - t0,
        kills=chaos.kills,
        ray_restarts=chaos.restarts,
        pool_restarts=int(gen.get("restarts", 0)),
        regenerated_groups=int(gen.get("regenerated_groups", 0)),
        rollouts_lost=shortfall + int(counters.get("skipped_items", 0)),
        stale_dropped=int(counters.get("stale_dropped", 0)),
        rss_mb=chaos.rss_mb(),
        error=error,
    )


MAX_GROWTH = 0.05
"""'Flat' memory: the second half of a process's life grows it by at most this fraction (the first half
still fills allocator pools and caches)."""


def rows_of(report: SoakReport) -> list[Row]:
    """The report as bench rows (the targets: every step, nothing lost, memory flat)."""
    case = f"async, {report.steps} steps, {sum(report.kills.values())} kills"
    note = report.error or (
        f"kills {report.kills}; Ray restarts {report.ray_restarts}; pool reloads {report.pool_restarts}, "
        f"regenerated groups {report.regenerated_groups}; stale dropped {report.stale_dropped}"
    )
    out = [
        Row(
            suite=SUITE, case=case, metric="steps completed", value=report.completed,
            baseline_name="steps asked", baseline=report.steps, ratio=report.completed / report.steps,
            target=">= 1.0x", met=report.completed == report.steps and not report.error, note=note,
            extra={"wall_s": report.wall_s},
        ),
        Row(
            suite=SUITE, case=case, metric="rollouts lost", value=report.rollouts_lost, target="0",
            met=report.rollouts_lost == 0,
        ),
        Row(
            suite=SUITE, case=case, metric="restarts (Ray)", value=sum(report.ray_restarts.values()),
            baseline_name="kills", baseline=sum(report.kills.values()),
            met=sum(report.ray_restarts.values()) >= sum(report.kills.values()),
            target="one per kill",
        ),
    ]  # fmt: skip
    for role, (first, mid, last) in report.rss_mb.items():
        out.append(
            Row(
                suite=SUITE, case=case, metric=f"RSS MB, {role}", value=last, baseline_name="half way",
                baseline=mid, ratio=mid / last if last else None,
                target=f"<= {MAX_GROWTH:.0%} growth in the 2nd half", met=last <= mid * (1 + MAX_GROWTH),
                note=f"after warm-up {first:.0f} MB",
            )
        )  # fmt: skip
    return out


def run(quick: bool) -> list[Row]:
    """Bench suite entry: 8 steps with a kill about every 4 s (quick, under a minute), else 60 steps."""
    report = soak(8 if quick else 60, kill_every_s=4.0 if quick else 5.0)
    return rows_of(report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between kills")
    p.add_argument("--seed", type=int, default=0, help="of the kill schedule")
    p.add_argument("--workdir", type=Path, default=None, help="run directory (default: a temp dir)")
    args = p.parse_args(argv)
    from bench.run import to_markdown

    report = soak(args.steps, kill_every_s=args.kill_every, seed=args.seed, workdir=args.workdir)
    print(json.dumps(asdict(report), indent=2))
    rows = rows_of(report)
    print(to_markdown(rows))
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
