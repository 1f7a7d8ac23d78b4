"""Faults a run survives (issue 10), each on the local Ray cluster with the tiny recipe.

Faults land at a chosen point: a test wraps the controller-side call around which the fault should hit
(`GeneratorPool._collect` runs once a generate request went out, so the replica dies with it queued or
running; `GeneratorPool.load`, `LearnerGroup.forward_backward`, `RewardScorer.score`) and kills the
actor's process there, with `ray.kill` or SIGKILL. Each survived fault is checked against an
uninterrupted run of the same seed: generation and scoring are pure functions of (weights, prompts,
seeds) and every role's state is restored from checkpoints, so the losses, rewards and logged rollouts
must come out exactly as without the fault. About 2 minutes on 2 CPU cores (3 when they are busy).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.soak import ASYNC, RECIPE, REWARD, fault_overrides, random_policy, step_rows
from orchestrator.config import load_recipe
from orchestrator.controller import RunFailed, latest_checkpoint
from orchestrator.launch import launch

BASELINE_STEPS = 5
COMPARED = (
    "learner/loss",
    "learner/grad_norm",
    "preview/reward_mean",
    "final/reward_mean",
    f"final/{REWARD}",
    "trained_items",
)


# ---------------------------------------------------------------------------------------------- helpers
def run_faulty(root: Path, policy: Path, *, steps: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Launch the tiny fault recipe in this process (on the session's Ray cluster); returns its summary."""
    cfg = load_recipe(RECIPE, fault_overrides(root, policy, steps=steps, extra=extra))
    assert launch(cfg, recipe=RECIPE) == 0
    return dict(json.loads((root / "summary.json").read_text()))


def uninterrupted(factory: pytest.TempPathFactory) -> Path:
    """The run every fault is compared with (BASELINE_STEPS steps, no faults); made once per session."""
    base = factory.getbasetemp()
    run = base / "fault-baseline"
    if not (run / "summary.json").exists():
        policy = random_policy(base / "fault-policy")
        run_faulty(run, policy, steps=BASELINE_STEPS, extra=(f"run.keep_checkpoints={BASELINE_STEPS}",))
    return run


def assert_same_steps(run: Path, baseline: Path, steps: range) -> None:
    """The given steps' losses and rewards equal the uninterrupted run's (float32 sums: 1e-6)."""
    got, want = step_rows(run), step_rows(baseline)
    for step in steps:
        for key in COMPARED:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), f"step {step}: {key}"


def rollouts(run: Path, last_step: int) -> list[tuple[Any, ...]]:
    """Every trained-stage rollout row up to `last_step` (step, stage, seed, ok, reward, score, thumbnail)."""
    from orchestrator.rollout_log import read_rollout_log

    t = read_rollout_log(run / "rollouts").to_pylist()
    keys = ("step", "stage", "group_id", "seed", "ok", "reward", f"score/{REWARD}", "thumbnail")
    rows = [tuple(r[k] for k in keys) for r in t if r["stage"] != "eval" and r["step"] <= last_step]
    return sorted(rows, key=lambda r: r[:4])


def eval_rows(run: Path) -> dict[int, int]:
    """Evaluation rows in the rollout log per step."""
    from orchestrator.rollout_log import read_rollout_log

    steps = [r["step"] for r in read_rollout_log(run / "rollouts").to_pylist() if r["stage"] == "eval"]
    return dict(collections.Counter(steps))


def _calls(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch, on_call: Any) -> None:
    """Wrap obj.name so that `on_call(n, self, args)` runs before its n-th call (0-based)."""
    original = getattr(obj, name)
    counter = itertools.count()

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        on_call(next(counter), self, args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)


def _sigkill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} survived its kill")


def _actor_pid(handle: Any) -> int:
    import ray

    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60))


# ---------------------------------------------------------------------------------------------- generator
def test_generator_killed_mid_generation_or_mid_sync_restarts_and_regenerates_the_same_rollouts(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from orchestrator.rollout import GeneratorPool

    pids: list[int] = []
    kills: list[str] = []

    def on_load(n: int, pool: GeneratorPool, args: tuple[Any, ...]) -> None:
        # Loads: 0 before training, then one after each step. The replica is idle here.
        pids.append(_actor_pid(pool.handles[0]))
        if n == 2:  # after step 2: dies while it loads (and re-quantizes) the new weights
            threading.Timer(0.02, os.kill, (pids[-1], signal.SIGKILL)).start()
            kills.append("SIGKILL mid-sync")

    def on_collect(n: int, pool: GeneratorPool, args: tuple[Any, ...]) -> None:
        # _collect runs once the generate request was sent, so the replica dies with it queued or
        # running. Call 0 is the evaluation before training, then preview and final of each step.
        if n == 3:  # step 2, preview: the process dies hard
            os.kill(pids[-1], signal.SIGKILL)
            kills.append("SIGKILL")
        elif n == 6:  # step 3, final: Ray kills the actor (and restarts it)
            ray.kill(pool.handles[args[0]], no_restart=False)
            kills.append("ray.kill")

    _calls(GeneratorPool, "load", monkeypatch, on_load)
    _calls(GeneratorPool, "_collect", monkeypatch, on_collect)
    summary = run_faulty(tmp_path, policy, steps=3)

    assert kills == ["SIGKILL", "SIGKILL mid-sync", "ray.kill"]
    assert pids[1] != pids[2], "the step-2 kill replaced the process"
    gen = summary["generator"]
    assert gen["restarts"] >= 3 and gen["regenerated_groups"] >= 4, gen  # 2 groups per killed call
    assert summary["steps"] == 3 and summary["weights_in_sync"] is True
    # regenerated rollouts are the very samples the un-killed run drew: same images, same rewards
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)
    assert_same_steps(tmp_path, baseline, range(1, 4))


class CrashLoop:
    """SIGKILLs, until stopped, every process of this session's Ray cluster whose title contains `title`, as
    soon as it shows up (Ray titles an actor's process `ray::<class>.<method running>`, and
    `ray::<name>:<class>.__init__` while it starts): with `RolloutGeneratorActor` the replica dies again each
    time Ray restarts it, with `RolloutGeneratorActor.generate` each of its generate calls kills its process."""

    def __init__(self, title: str) -> None:
        self.title, self.kills = title, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="crash-loop", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()  # the embedded cluster's processes all descend from this one
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    if self.title in " ".join(proc.cmdline()):
                        proc.kill()
                        self.kills += 1
                except psutil.Error:  # gone meanwhile
                    continue
            time.sleep(0.02)


@pytest.mark.parametrize(
    "title",
    ["RolloutGeneratorActor", "RolloutGeneratorActor.generate"],
    ids=["dies-on-restart", "dies-in-generate"],
)
def test_crash_looping_generator_stops_the_run_quickly_naming_it_with_a_resumable_checkpoint(
    ray_cluster: object, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, title: str
) -> None:
    from orchestrator.rollout import GeneratorPool

    loop = CrashLoop(title)

    def on_collect(n: int, pool: GeneratorPool, args: tuple[Any, ...]) -> None:
        if n == 3:  # step 2, preview: from here on generator-0 keeps dying
            loop.start()

    _calls(GeneratorPool, "_collect", monkeypatch, on_collect)
    t0 = time.perf_counter()
    try:
        with pytest.raises(
            RunFailed,
            match=r"step 2 failed .*generator-0 failed generating for v1: it died \d+ times \(max_attempts=4\)",
        ):
            run_faulty(tmp_path, policy, steps=3)
    finally:
        loop.stop()
    assert loop.kills >= 4
    assert time.perf_counter() - t0 < 90, "a crash loop ends the run in seconds, not after minutes of waiting"
    assert not (tmp_path / "summary.json").exists()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-0000001", "the state step 2 started from, to resume"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- rewards
def test_reward_service_killed_and_restarted_is_retried_not_zero_filled(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from orchestrator.roles import RewardScorer

    pids: list[int] = []

    # Score call 0 is the evaluation before training, then preview and final per step.
    def on_call(n: int, scorer: RewardScorer, args: tuple[Any, ...]) -> None:
        if n not in (3, 6):
            return
        host = ray.get_actor(f"reward-{REWARD}-0")
        pids.append(_actor_pid(host))
        if n == 3:  # step 2, preview: the process dies hard; Ray restarts the host
            _sigkill_and_wait(pids[-1])
        else:  # step 3, final: Ray kills it and restarts it
            ray.kill(host, no_restart=False)
            _wait_gone(pids[-1])

    _calls(RewardScorer, "score", monkeypatch, on_call)
    summary = run_faulty(tmp_path, policy, steps=3)

    assert len(set(pids)) == 2, "the second kill must hit the restarted service"
    assert summary["steps"] == 3 and summary["counters"]["skipped_items"] == 0
    got = rollouts(tmp_path, 3)
    assert got and all(r[4] for r in got)  # every item scored: ok
    assert all(math.isfinite(r[5]) and r[6] != 0.0 for r in got)  # a jpeg score is a negative size
    assert got == rollouts(baseline, 3)  # rescored, with the values the service gives when it stays up
    assert_same_steps(tmp_path, baseline, range(1, 4))


def test_reward_service_down_past_its_budget_stops_with_a_resumable_checkpoint(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from orchestrator.roles import RewardScorer

    def on_call(n: int, scorer: RewardScorer, args: tuple[Any, ...]) -> None:
        if n == 3:  # step 2, preview: gone for good
            ray.kill(ray.get_actor(f"reward-{REWARD}-0"), no_restart=True)

    _calls(RewardScorer, "score", monkeypatch, on_call)
    spec = f"rewards=[{{name: {REWARD}, scorer: jpeg_compressibility, retry_budget_s: 3, max_attempts: 100}}]"
    t0 = time.perf_counter()
    with pytest.raises(RunFailed, match=f"step 2 failed .*reward service '{REWARD}'.* is down"):
        run_faulty(tmp_path, policy, steps=3, extra=(spec, "run.checkpoint_every=0"))
    assert time.perf_counter() - t0 < 120
    assert not (tmp_path / "summary.json").exists()
    ckpt = latest_checkpoint(tmp_path)  # checkpoint_every=0: only the stop wrote one
    assert ckpt is not None and ckpt.name == "step-0000001", "a checkpoint of the last complete step"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # It holds the state step 2 started from (seeds, data position, reward statistics), not what the
    # failed step had drawn: the uninterrupted run's own step-1 checkpoint. Resuming from such a
    # checkpoint repeats the run exactly (test_resume.py).
    got = json.loads((ckpt / "controller.json").read_text())
    want = json.loads((baseline / "checkpoints" / "step-0000001" / "controller.json").read_text())
    for key in ("step", "version", "rng", "data", "rewards", "produced", "counters"):
        assert got[key] == want[key], key


# ---------------------------------------------------------------------------------------------- learner
def forward_backward_of(step: int) -> int:
    """The 0-based `LearnerGroup.forward_backward` call that starts `step` of a fault run: each step makes
    two, the replay buffer's batch and then the NFT batch (the buffer admits before step 1's draw), then
    one per replay-only update of the recipe's."""
    return (2 + load_recipe(RECIPE).rollout.replay.updates) * (step - 1)


def _kill_rank0_on(
    call: int | set[int],
    monkeypatch: pytest.MonkeyPatch,
    pids: list[int],
    where: str = "LearnerGroup.forward_backward",
) -> None:
    """SIGKILL learner rank 0 just before the `call`-th call(s) (0-based) of `where`, a LearnerGroup or Roles
    method; `pids` gets rank 0's process id at each call."""
    from actors.learner_group import LearnerGroup
    from orchestrator.roles import Roles

    owner, method = where.split(".")

    def on_call(n: int, obj: LearnerGroup | Roles, args: tuple[Any, ...]) -> None:
        pids.append((obj if isinstance(obj, LearnerGroup) else obj.learners).pids()[0])
        if n in ({call} if isinstance(call, int) else call):
            _sigkill_and_wait(pids[-1])

    _calls({"LearnerGroup": LearnerGroup, "Roles": Roles}[owner], method, monkeypatch, on_call)


@pytest.mark.parametrize("step", [1, 2], ids=["step-1-before-any-checkpoint", "step-2"])
def test_learner_rank_killed_restores_all_ranks_from_the_last_checkpoint(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """Step 2 is redone from the step-1 checkpoint; step 1, with no checkpoint yet, from the run's start
    (the pretrained weights, the first prompts and seeds, an empty replay buffer)."""
    pids: list[int] = []
    killed = forward_backward_of(step)
    _kill_rank0_on(killed, monkeypatch, pids)
    summary = run_faulty(tmp_path, policy, steps=3)

    assert summary["counters"]["learner_restores"] == 1 and summary["steps"] == 3
    assert pids[0] == pids[killed] != pids[-1]  # the killed rank was replaced
    assert summary["weights_in_sync"] is True
    assert_same_steps(tmp_path, baseline, range(1, 4))
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)  # the lost step's rows are not logged twice


def test_learner_rank_killed_in_async_mode_restores_and_restarts_the_producer(
    ray_cluster: object, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Async mode: the rollout producer is stopped before the restore rewinds what it samples with, and a
    fresh one starts from the restored step; the run finishes with every step trained."""
    pids: list[int] = []
    _kill_rank0_on(forward_backward_of(2), monkeypatch, pids)
    summary = run_faulty(tmp_path, policy, steps=3, extra=(*ASYNC, "run.checkpoint_every=1"))

    assert summary["counters"]["learner_restores"] == 1 and summary["steps"] == 3
    assert pids[0] == pids[forward_backward_of(2)] != pids[-1]
    assert summary["weights_in_sync"] is True
    rows = step_rows(tmp_path)
    assert all(rows[s]["learner/loss"] is not None for s in range(1, 4)), rows


def test_learner_rank_killed_again_in_the_retried_step_restores_again(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids: list[int] = []
    killed = forward_backward_of(2)  # step 2's first forward-backward, then its retry's
    _kill_rank0_on({killed, killed + 1}, monkeypatch, pids)
    summary = run_faulty(tmp_path, policy, steps=3)

    assert summary["counters"]["learner_restores"] == 2 and summary["steps"] == 3
    assert len(set(pids)) == 3, pids  # two replacements
    assert_same_steps(tmp_path, baseline, range(1, 4))
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)


def test_learner_rank_killed_during_the_restore_uses_another_restore(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kill_rank0_on(forward_backward_of(2), monkeypatch, [])
    _kill_rank0_on(0, monkeypatch, [], "LearnerGroup.load")  # the restarted rank, as it loads step 1
    summary = run_faulty(tmp_path, policy, steps=3)

    assert summary["counters"]["learner_restores"] == 2 and summary["steps"] == 3
    assert_same_steps(tmp_path, baseline, range(1, 4))


def test_learner_rank_killed_during_the_last_restore_left_stops_naming_it(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kill_rank0_on(forward_backward_of(2), monkeypatch, [])
    _kill_rank0_on(0, monkeypatch, [], "LearnerGroup.load")
    with pytest.raises(
        RunFailed,
        match=r"(?s)learner failed in the restore from \S+step-0000001: learner-rank0 failed in load.*"
        r"\(run\.max_restores=1 used\)",
    ):
        run_faulty(tmp_path, policy, steps=3, extra=("run.max_restores=1",))


def test_learner_rank_killed_with_on_learner_failure_stop_ends_the_run_clearly(
    ray_cluster: object, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids: list[int] = []
    _kill_rank0_on(forward_backward_of(2), monkeypatch, pids)
    with pytest.raises(
        RunFailed, match=r"learner failed in step 2: learner-rank0 failed in forward_backward"
    ):
        run_faulty(tmp_path, policy, steps=3, extra=("run.on_learner_failure=stop",))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-0000001"


# Calls: `save` once per step (checkpoint_every=1) and at the end, `sample_eval` before training and
# after it (eval_every=0), `export_diffusers` once at the end.
@pytest.mark.parametrize(
    ("where", "call"),
    [("LearnerGroup.save", 1), ("Roles.sample_eval", 1), ("LearnerGroup.export_diffusers", 0)],
    ids=["step-2-checkpoint", "final-evaluation", "export"],
)
def test_learner_rank_killed_outside_a_step_restores_and_finishes_as_without_the_fault(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, call: int
) -> None:
    """A rank dies while step 2's checkpoint is written, during the final evaluation (the death shows at
    the next learner call) or while the policy is exported: every rank restarts from the last complete
    checkpoint, the run trains on from there and ends as the uninterrupted run does."""
    pids: list[int] = []
    _kill_rank0_on(call, monkeypatch, pids, where)
    summary = run_faulty(tmp_path, policy, steps=3)

    assert summary["counters"]["learner_restores"] == 1 and summary["steps"] == 3
    assert len(pids) > call + 1 and pids[call] != pids[-1], "the phase ran again on the restarted ranks"
    assert summary["weights_in_sync"] is True and (tmp_path / "export" / "config.json").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was redone"
    assert_same_steps(tmp_path, baseline, range(1, 4))
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)
    evaluated = eval_rows(baseline)[0]  # rows of one evaluation (the baseline trains 5 steps, this run 3)
    assert eval_rows(tmp_path) == {0: evaluated, 3: evaluated}, "a redone final evaluation logs once"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = collections.Counter((r["step"], "eval" if f"eval/{REWARD}" in r else "step") for r in logged)
    assert kinds == {(0, "eval"): 1, (1, "step"): 1, (2, "step"): 1, (3, "step"): 1, (3, "eval"): 1}


@pytest.mark.parametrize(
    ("where", "call", "setting", "message", "last"),
    [
        (
            "LearnerGroup.save", 1, "run.on_learner_failure=stop",
            r"learner failed in checkpoint of step 2: learner-rank0 failed in save", "step-0000001",
        ),
        (
            "LearnerGroup.export_diffusers", 0, "run.max_restores=0",
            r"(?s)learner failed in final evaluation, checkpoint and export: learner-rank0 failed in "
            r"export_diffusers.*\(run.max_restores=0 used\)",
            "step-0000003",
        ),
    ],
    ids=["checkpoint-stop", "export-no-restores-left"],
)  # fmt: skip
def test_learner_rank_killed_outside_a_step_without_restores_stops_naming_the_phase(
    ray_cluster: object,
    policy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    call: int,
    setting: str,
    message: str,
    last: str,
) -> None:
    pids: list[int] = []
    _kill_rank0_on(call, monkeypatch, pids, where)
    with pytest.raises(RunFailed, match=message):
        run_faulty(tmp_path, policy, steps=3, extra=(setting,))
    assert not (tmp_path / "summary.json").exists()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == last, "only complete checkpoints count"
    for half in (tmp_path / "checkpoints").glob(".tmp-*"):
        assert not (half / "COMPLETE").exists()


# ---------------------------------------------------------------------------------------------- NaN
class NaNJpeg:
    """JPEG compressibility that answers NaN for every 8th item, and for all items from call `all_from`."""

    def __init__(self, all_from: int) -> None:
        from rewards.base import make_scorer

        self.inner = make_scorer("jpeg_compressibility")
        self.all_from = all_from
        self.calls = 0
        self.items = 0
        self.nan = 0

    def info(self) -> Any:
        return replace(self.inner.info(), max_batch=64)

    def score(self, images: np.ndarray, prompts: list[str]) -> Any:
        batch = self.inner.score(images, prompts)
        head = self.inner.info().heads[0]
        idx = np.arange(self.items, self.items + len(prompts))
        bad = (idx % 8 == 3) | (self.calls >= self.all_from)
        batch.scores[head] = np.where(bad, np.nan, batch.scores[head]).astype(np.float32)
        self.calls, self.items, self.nan = (
            self.calls + 1,
            self.items + len(prompts),
            self.nan + int(bad.sum()),
        )
        return type(batch)(scores=batch.scores, extras=batch.extras)  # re-checked: NaN -> failed item


@pytest.fixture
def nan_service() -> Iterator[tuple[str, NaNJpeg]]:
    """A reward service in this process (the scorer is not a registered one) on 127.0.0.1:0."""
    from rewards.server import ServerConfig, start_server

    scorer = NaNJpeg(all_from=9)  # call 9: step 5's preview
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_server(scorer, ServerConfig()), loop).result(30)
    yield running.address, scorer
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_non_finite_rewards_and_gradients_are_skipped_and_counted_until_the_skip_rate_stops_the_run(
    ray_cluster: object,
    policy: Path,
    tmp_path: Path,
    nan_service: tuple[str, NaNJpeg],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from actors.learner_group import LearnerGroup
    from actors.records import TrainBatch
    from orchestrator.rollout_log import read_rollout_log

    def poison(n: int, group: LearnerGroup, args: tuple[Any, ...]) -> None:
        batch: TrainBatch = args[0]
        if n == forward_backward_of(2) + 1:  # step 2's NFT batch: the loss and every gradient turn NaN
            assert batch.advantages is not None
            batch.advantages = torch.full_like(batch.advantages, math.nan)

    _calls(LearnerGroup, "forward_backward", monkeypatch, poison)
    address, scorer = nan_service
    spec = f"rewards=[{{name: {REWARD}, scorer: jpeg_compressibility, address: '{address}'}}]"
    with pytest.raises(RunFailed, match=r"max_skip_rate=0.3.*reward_failed.*non_finite_grad"):
        run_faulty(tmp_path, policy, steps=10, extra=(spec, "run.max_skip_rate=0.3"))

    rows = step_rows(tmp_path)
    assert all("learner/loss" in rows[s] for s in range(1, 5)), "1 in 8 failed items: steps 1-4 train"
    assert rows[2]["learner/skipped"] == 1.0 and rows[2]["learner/nonfinite_loss"] == 1.0
    assert rows[2]["learner/loss"] is None and "learner/loss" in rows[2]["non_finite"]  # null, flagged
    assert not rows[3].get("learner/skipped") and rows[3]["learner/loss"] is not None  # a step later: fine
    assert 5 <= max(rows) < 10, "stopped once a skip rate passed 0.3, after step 4 (all rewards NaN)"
    log = read_rollout_log(tmp_path / "rollouts").to_pylist()
    failed = [r for r in log if not r["ok"]]
    assert len(failed) == scorer.nan  # every NaN item is logged as failed ...
    assert all(math.isnan(r["reward"]) and math.isnan(r[f"score/{REWARD}"]) for r in failed)  # ... not as 0
    counters = json.loads((latest_checkpoint(tmp_path) / "controller.json").read_text())["counters"]  # type: ignore[operator]
    trained_failed = sum(1 for r in failed if r["stage"] != "eval")
    assert counters["skipped_items"] == trained_failed and counters["reasons"]["reward_failed"] >= 5
    assert counters["reasons"]["non_finite_grad"] == 1
