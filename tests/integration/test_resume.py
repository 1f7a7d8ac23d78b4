"""The whole job killed (SIGKILL of the driver) mid-step and mid-checkpoint-save, then `--resume`.

`python -m orchestrator run` runs as a subprocess (its own embedded Ray cluster, sync mode, CPU, fixed
seed) and is killed twice: during step 3, once the second checkpoint is complete, and, after the first
resume, while a checkpoint folder is being written. The half-written `.tmp-step-*` folder must never be
loaded; each resume continues from the last complete checkpoint, and the run's metrics and rollout log
must equal those of an uninterrupted run of the same seed, step by step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.soak import RECIPE, fault_overrides, random_policy, step_rows
from orchestrator.controller import latest_checkpoint
from tests.integration.test_faults import BASELINE_STEPS, assert_same_steps, rollouts, uninterrupted

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def baseline(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return uninterrupted(tmp_path_factory)


class Driver:
    """`python -m orchestrator run` of the fault recipe as a subprocess in its own session."""

    def __init__(self, run: Path, policy: Path, log: Path, *, resume: bool) -> None:
        args = [sys.executable, "-m", "orchestrator", "run", str(RECIPE)]
        for item in fault_overrides(run, policy, steps=BASELINE_STEPS):
            args += ["--set", item]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [*args, "--resume" if resume else "--no-resume"], cwd=ROOT, env=env,
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill_when(self, ready: Callable[[], bool], timeout_s: float = 300.0) -> None:
        """SIGKILL the driver as soon as `ready()` holds (polled every millisecond)."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.proc.poll() is None, f"the run ended before the kill:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting to kill the driver"
            time.sleep(0.001)
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(60) == -signal.SIGKILL
        self._reap_cluster()

    def finish(self, timeout_s: float = 300.0) -> None:
        assert self.proc.wait(timeout_s) == 0, self.log.read_text()[-3000:]
        self._reap_cluster()

    def _reap_cluster(self) -> None:
        """The embedded cluster dies with its driver, except two agents that linger: end them (by pid)."""
        out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            pid, pgid = (int(x) for x in line.split())
            if pgid == self.proc.pid and pid != self.proc.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _writing_checkpoint(checkpoints: Path) -> bool:
    """A checkpoint is half-written: its temp folder exists and the learner has started saving into it."""
    try:
        return any(
            p.name.startswith(".tmp-step-") and (p / "learner").exists() for p in checkpoints.iterdir()
        )
    except FileNotFoundError:
        return False


def test_driver_killed_mid_step_and_mid_checkpoint_resumes_exactly(
    baseline: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    policy = random_policy(tmp_path_factory.getbasetemp() / "fault-policy")
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"

    # 1: killed during step 3, once the second checkpoint is complete
    Driver(run, policy, tmp_path / "1.log", resume=False).kill_when(
        lambda: (ckpts / "step-0000002" / "COMPLETE").exists()
    )
    assert latest_checkpoint(run) == ckpts / "step-0000002" and not (run / "summary.json").exists()

    # 2: resumed, then killed while a later checkpoint is being written
    Driver(run, policy, tmp_path / "2.log", resume=True).kill_when(lambda: _writing_checkpoint(ckpts))
    half = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-step-")]
    assert len(half) == 1 and not (half[0] / "COMPLETE").exists()
    last = latest_checkpoint(run)
    assert last is not None and last.name < half[0].name.removeprefix(".tmp-"), "never the half-written one"

    # 3: resumed to the end, from the last complete checkpoint; each resume dropped the rows of the steps
    # it trains again, so metrics.jsonl holds every step once, in order
    Driver(run, policy, tmp_path / "3.log", resume=True).finish()
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "learner/loss" in r] == list(range(1, BASELINE_STEPS + 1))
    assert not list(ckpts.glob(".tmp-step-*")), "the half-written folder was replaced when its step came"

    assert sorted(step_rows(run)) == list(range(1, BASELINE_STEPS + 1))
    assert_same_steps(run, baseline, range(1, BASELINE_STEPS + 1))
    assert rollouts(run, BASELINE_STEPS) == rollouts(baseline, BASELINE_STEPS)  # none lost, none twice
