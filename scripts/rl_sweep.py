"""Sweep an RL recipe's settings in-process, many runs at once on one machine (one GPU or many cores).

    # one run: the demo's RL stage from a finished pretraining, evaluated before and after on 24x32 samples
    .venv/bin/python scripts/rl_sweep.py one --config runs/tiny/config.yaml --pretrained runs/tiny-pretrain \
        --seed 0 --set learner.optim.lr=2e-3 --out sweep.jsonl
    # both stages: the pretraining recipe replayed in-process first, then RL; also evaluated at guidance 1
    .venv/bin/python scripts/rl_sweep.py one --config runs/tiny/config.yaml --pretrain recipes/tiny_pretrain.yaml \
        --pretrain-set run.steps=1600 --eval-guidance 1.0
    # a sweep: one "TAG SEED [--set k=v ...] [--eval-at 20,40]" per line, 12 runs at a time
    .venv/bin/python scripts/rl_sweep.py many jobs.txt --parallel 12 --out sweep.jsonl -- --config ... --pretrained ...

A run here is the controller's Sol-RL step (`Controller._make_batch` and `_train_step`, with best-sample
replay when the recipe turns it on), after its pretraining
step (`orchestrator.rollout.dataset_batch`) when `--pretrain` names a pretraining recipe, with the same objects
(Learner, RolloutEngine, the reward scorer, keep_seeds, advantage_batch) and the same random draws in the
same order, but in one process: no Ray, no gRPC, no checkpoints, no logs. On a CPU it reproduces a real
run's losses and pretrained weights to the digit (the short demo test checks both). On a GPU the
rollout copy computes in BF16 unless `--fp32-rollout`, and numbers differ from the CPU's: rank settings
there, then confirm them with `sana-rl run` + `sana-rl eval` on the machine the recipe is for.

The reward is the recipe's first scorer, called directly, with the client's running normalisation; the
text encoder can be replaced by an embedding cache (`--emb-cache`, e.g. where the MiniLM package is not
installed). Each run appends one JSON line: before/after means of every score head, the paired gain and
its standard error, and the mean training reward of the first and last five steps.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


def load_config(path: Path, overrides: list[str]) -> RunConfig:
    """A recipe's relative data paths are resolved against its folder, as `sana-rl run` does; a run's saved
    config.yaml (beside its metrics.jsonl) holds them relative to where the run started, as `sana-rl eval`
    reads them."""
    from orchestrator.config import load_recipe
    from orchestrator.evaluate import saved_config

    if path.name == "config.yaml" and (path.parent / "metrics.jsonl").exists():
        return saved_config(path.parent, overrides)
    return load_recipe(path, overrides)


def _stub_grpc_extras() -> None:
    """The recipe schema imports the reward client, which imports grpc's health service and our generated
    service stubs; a machine without grpcio-health-checking (or with an older grpcio) still parses recipes."""
    import types

    names = ["grpc_health", "grpc_health.v1", "grpc_health.v1.health_pb2", "grpc_health.v1.health_pb2_grpc"]
    try:
        import grpc_health.v1.health_pb2  # noqa: F401

        names = []
    except ImportError:
        pass
    try:
        from sana_rl.reward.v1 import reward_pb2_grpc  # noqa: F401
    except Exception:  # a version check of the generated code raises RuntimeError, not ImportError
        names.append("sana_rl.reward.v1.reward_pb2_grpc")

    def attr(item: str) -> type:
        if item.startswith("__"):  # inspect and importlib probe __file__ and friends on every module
            raise AttributeError(item)
        return type(item, (), {})

    for name in names:
        module = types.ModuleType(name)
        module.__path__ = []
        module.__getattr__ = attr  # type: ignore[method-assign]
        sys.modules[name] = module


def run_one(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _stub_grpc_extras()
    from actors.generator import GenerateRequest, RolloutEngine
    from actors.learner import Learner
    from actors.records import Rewards, Rollouts
    from orchestrator.launch import init_weights
    from orchestrator.replay import ReplayBuffer, replay_seed
    from orchestrator.roles import DataFeed
    from orchestrator.rollout import advantage_batch, keep_seeds
    from rewards.base import make_scorer
    from rewards.client import RunningNorm  # the client's own normalisation, as a run's rewards get it

    pretrained = pretrain(a) if a.pretrain else Path(a.pretrained)
    cfg = load_config(Path(a.config), [f"run.seed={a.seed}", *a.set])
    cfg.model.pretrained = str(init_weights(pretrained))
    if a.emb_cache:
        cfg.codec.embedding_cache = a.emb_cache
    ro, ev = cfg.rollout, cfg.eval
    learner = Learner(rank=0, world_size=1, num_threads=a.threads)
    learner.init_distributed(*learner.open_rendezvous(), timeout_s=120)
    learner.setup(cfg.model, cfg.learner, cfg.loss, seed=cfg.run.seed)
    formats = sorted({ro.preview_precision, ro.final_precision, "bf16"})
    engine = RolloutEngine(
        cfg.model, cfg.codec, cfg.sampler, cfg.quant, formats, device=learner.device, autocast=cfg.rollout.autocast
    )  # fmt: skip
    spec = cfg.rewards[0]
    scorer = make_scorer(spec.scorer, **spec.scorer_kwargs)
    head = scorer.info().heads[0]
    norm = RunningNorm()
    data = DataFeed(cfg)
    rng = torch.Generator().manual_seed(cfg.run.seed)  # the controller's generator, drawn in its order
    replay = ReplayBuffer(ro.replay, spec.name) if ro.replay.enabled else None

    def draw() -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))

    def sync() -> None:
        snap = learner.state_for_rollout()
        assert snap is not None
        engine.load_weights(snap)

    def generate(
        prompts: list[str],
        seeds: list[int],
        groups: list[int],
        steps: int,
        precision: Any,
        noise: Any = None,
        evaluation: bool = False,
    ) -> Rollouts:
        req = GenerateRequest(
            prompts=prompts, seeds=seeds, group_ids=groups, steps=steps, precision=precision,
            expect_version=engine.version, noise_level=noise, evaluation=evaluation,
        )  # fmt: skip
        return engine.generate(req)

    def score(roll: Rollouts) -> Rewards:
        b = scorer.score(roll.images, roll.prompts)
        x = b.scores[head]
        norm.update(x[b.ok])
        return Rewards(
            total=torch.from_numpy(np.where(b.ok, norm(x), 0.0).astype(np.float32)),
            per_scorer={spec.name: torch.from_numpy(x.astype(np.float32))},
            ok=torch.from_numpy(b.ok),
        )

    eval_prompts = data.eval_prompts(ev.num_prompts)

    def evaluate(guidance: float | None = None, per_prompt: int = a.eval_seeds) -> dict[str, np.ndarray]:
        if guidance is not None:  # this evaluation only: the recipe's sampler otherwise
            sampler = engine.sampler_cfg
            engine.sampler_cfg = replace(sampler, guidance_scale=guidance)
            try:
                return evaluate(per_prompt=per_prompt)
            finally:
                engine.sampler_cfg = sampler
        flat = [p for p in eval_prompts for _ in range(per_prompt)]
        seeds = [ev.seed + i for i in range(len(flat))]  # as `sana-rl eval --seeds-per-prompt` draws them
        groups = [i // per_prompt for i in range(len(flat))]
        parts: dict[str, list[np.ndarray]] = {}
        for lo in range(0, len(flat), 256):
            sl = slice(lo, lo + 256)
            roll = generate(flat[sl], seeds[sl], groups[sl], ev.steps, "bf16", 0.0, evaluation=True)
            b = scorer.score(roll.images, roll.prompts)
            for k, v in {**b.scores, **b.extras}.items():
                parts.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
        return {k: np.concatenate(v) for k, v in parts.items()}

    sync()
    if a.fp32_rollout and engine.device.type == "cuda":
        # The quantized copies keep the BF16 activations of any GPU run; regeneration and evaluation compute
        # in float32 as the CPU demo's do. Reloaded, so the float32 copy is not BF16-rounded.
        engine.policy.float()
        sync()
    before = evaluate()
    extra_g = [float(g) for g in a.eval_guidance.split(",") if g]
    before_g = {g: float(evaluate(g)[head].mean()) for g in extra_g}
    also = [int(n) for n in a.also_eval_seeds.split(",") if n]
    before_n = {n: {k: float(v.mean()) for k, v in evaluate(per_prompt=n).items()} for n in also}
    eval_at = {int(s) for s in a.eval_at.split(",") if s}
    curve: dict[int, float] = {}
    train_reward: list[float] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, cfg.run.steps + 1):
        prompts = data.next_prompts(ro.prompts_per_step)
        groups = [
            (step - 1) * ro.prompts_per_step + i for i in range(len(prompts)) for _ in range(ro.num_seeds)
        ]
        seeds = [draw() for _ in groups]
        flat = [p for p in prompts for _ in range(ro.num_seeds)]
        roll = generate(flat, seeds, groups, ro.preview_steps, ro.preview_precision)
        rew = score(roll)
        keep = keep_seeds(roll, rew, keep=ro.keep, how=ro.selection, generator=rng)
        if ro.two_stage:
            kept = roll.select(keep)
            roll = generate(
                kept.prompts, kept.seeds.tolist(), kept.group_ids.tolist(), ro.final_steps, ro.final_precision
            )
            rew = score(roll)
        else:
            roll, rew = roll.select(keep), rew.select(keep)
        train_reward.append(float(rew.per_scorer[spec.name].mean()))
        if replay is not None:
            replay.admit(roll, rew)
        batch, _ = advantage_batch(roll, rew, std=cfg.loss.adv_std, world=1, seed=draw())
        if batch is not None:
            extra = replay.batch(replay_seed(cfg.run.seed, step), 1) if replay is not None else None
            if extra is not None:
                learner.forward_backward(extra)
            losses.append(learner.forward_backward(batch)["loss"])
            skipped = learner.optim_step()[1]["skipped"]
            for k in range(1, ro.replay.updates + 1 if extra is not None and not skipped else 1):
                assert replay is not None  # Controller._replay_updates
                more = replay.batch(replay_seed(cfg.run.seed, step, k), 1)
                assert more is not None
                learner.forward_backward(more)
                learner.optim_step(advance=False)
            sync()
        if step in eval_at:
            curve[step] = float(evaluate()[head].mean())
    t_train = time.perf_counter() - t0
    after = evaluate()
    after_g = {g: float(evaluate(g)[head].mean()) for g in extra_g}
    after_n = {n: {k: float(v.mean()) for k, v in evaluate(per_prompt=n).items()} for n in also}
    diff = after[head] - before[head]

    import torch.distributed as dist

    dist.destroy_process_group()
    return {
        "tag": a.tag, "seed": a.seed, "set": a.set, "steps": cfg.run.steps, "device": str(learner.device),
        "before": float(before[head].mean()), "after": float(after[head].mean()),
        "gain": float(diff.mean()), "stderr": float(diff.std(ddof=1) / math.sqrt(len(diff))),
        "heads_before": {k: float(v.mean()) for k, v in before.items()},
        "heads_after": {k: float(v.mean()) for k, v in after.items()},
        "curve": curve, "train_reward_first5": float(np.mean(train_reward[:5])),
        "train_reward_last5": float(np.mean(train_reward[-5:])), "losses_first3": losses[:3],
        "train_s": t_train, "pretrain": a.pretrain_set if a.pretrain else a.pretrained,
        "guidance_before": before_g, "guidance_after": after_g, "also_before": before_n, "also_after": after_n,
    }  # fmt: skip


def pretrain(a: argparse.Namespace) -> Path:
    """The controller's pretraining step (`dataset_batch` + `_train_step`) in-process, its
    weights exported to `--pretrain-out`; the directory to start the RL stage from."""
    from actors.generator import RolloutEngine
    from actors.learner import Learner
    from orchestrator.config import load_recipe
    from orchestrator.roles import DataFeed
    from orchestrator.rollout import dataset_batch

    cfg = load_recipe(a.pretrain, [f"run.seed={a.pretrain_seed}", *a.pretrain_set])
    if a.emb_cache:
        cfg.codec.embedding_cache = a.emb_cache
    learner = Learner(rank=0, world_size=1, num_threads=a.threads)
    learner.init_distributed(*learner.open_rendezvous(), timeout_s=120)
    learner.setup(cfg.model, cfg.learner, cfg.loss, seed=cfg.run.seed)
    engine = RolloutEngine(cfg.model, cfg.codec, cfg.sampler, cfg.quant, ["bf16"], device=learner.device)
    data = DataFeed(cfg)
    rng = torch.Generator().manual_seed(cfg.run.seed)
    for _ in range(cfg.run.steps):
        images, captions = data.next_images(cfg.learner.batch_size)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))  # Controller._seed, in its order
        batch, _ = dataset_batch(engine, images, captions, cfg.loss.fm.caption_dropout, seed)
        learner.forward_backward(batch)
        learner.optim_step()
    out = Path(a.pretrain_out or f"{a.out}.pretrain-{a.tag}-{a.seed}")
    learner.export_diffusers(str(out))

    import torch.distributed as dist

    dist.destroy_process_group()
    return out


def run_many(jobs: Path, parallel: int, out: str, common: list[str]) -> int:
    """Each line of `jobs` ("TAG SEED [ARGS]") as its own process, `parallel` at a time; failures logged."""
    lines = [ln.split() for ln in jobs.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    pending, failed = list(lines), 0
    running: list[tuple[str, str, subprocess.Popen[bytes], Any]] = []
    while pending or running:
        while pending and len(running) < parallel:
            tag, seed, *rest = pending.pop(0)
            cmd = [sys.executable, __file__, "one", "--tag", tag, "--seed", seed, "--out", out]
            log = open(f"{out}.{tag}-{seed}.log", "w")  # closed when its process ends, below
            cmd += [*common, *rest]
            running.append((tag, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1.0)
        for item in [r for r in running if r[2].poll() is not None]:
            running.remove(item)
            item[3].close()
            if item[2].returncode:
                failed += 1
                print(f"FAILED {item[0]} seed {item[1]} (exit {item[2].returncode}): see {item[3].name}")
    print(f"{len(lines) - failed} of {len(lines)} runs finished -> {out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="one run; appends a JSON line to --out")
    one.add_argument("--config", required=True, help="a recipe or a run's config.yaml")
    start = one.add_mutually_exclusive_group(required=True)
    start.add_argument("--pretrained", help="a finished run directory or a diffusers directory")
    start.add_argument("--pretrain", help="a pretraining recipe, run in-process first (`--pretrain-set`)")
    one.add_argument("--pretrain-set", action="append", default=[], help="dotted.key=value for --pretrain")
    one.add_argument("--pretrain-seed", type=int, default=0)
    one.add_argument("--pretrain-out", default=None, help="where --pretrain exports (default: beside --out)")
    one.add_argument(
        "--eval-guidance", default="", help="also evaluate at these guidance scales (comma-separated)"
    )
    one.add_argument("--seed", type=int, default=0, help="run.seed")
    one.add_argument("--set", action="append", default=[], help="dotted.key=value, as `sana-rl run --set`")
    one.add_argument("--tag", default="run")
    one.add_argument("--eval-seeds", type=int, default=32, help="seeds per evaluation prompt")
    one.add_argument(
        "--also-eval-seeds", default="", help="also evaluate at these seeds per prompt (comma-separated)"
    )
    one.add_argument("--eval-at", default="", help="comma-separated steps to evaluate at on the way")
    one.add_argument("--threads", type=int, default=2)
    one.add_argument("--emb-cache", default=None, help="codec.embedding_cache (no text encoder needed)")
    one.add_argument("--fp32-rollout", action="store_true", help="GPU: regenerate and evaluate in float32")
    one.add_argument("--out", default="sweep.jsonl")
    many = sub.add_parser("many", help="a job file, several runs at a time")
    many.add_argument("jobs", type=Path)
    many.add_argument("--parallel", type=int, default=4)
    many.add_argument("--out", default="sweep.jsonl")
    a, common = p.parse_known_args(argv)  # many: the rest (after --) goes to every run
    if a.cmd == "many":
        return run_many(a.jobs, a.parallel, a.out, [x for x in common if x != "--"])
    if common:
        p.error(f"unrecognized arguments: {' '.join(common)}")
    rec = run_one(a)
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
