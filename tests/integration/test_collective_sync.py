"""Runs with `resources.weight_sync: collective` (gloo on a CPU): learner rank 0 broadcasts the rollout
weights to the generators in their own process group instead of Ray's object store.

Each run is the fault suite's tiny recipe and is compared with its uninterrupted object-store run
(test_faults.uninterrupted): the same weights reach the generators either way, so the rollouts, rewards
and losses must be the same to float32 rounding, also when a generator or learner rank dies on the way
and the group has to be formed again.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bench.soak import ASYNC, step_rows
from tests.integration.test_faults import (
    _actor_pid,
    _calls,
    _kill_rank0_on,
    _sigkill_and_wait,
    assert_same_steps,
    forward_backward_of,
    rollouts,
    run_faulty,
)

COLLECTIVE = ("resources.weight_sync=collective",)


def _count(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of obj.name, counted in the returned one-element list."""
    seen = [0]

    def on_call(n: int, *_: Any) -> None:
        seen[0] = n + 1

    _calls(obj, name, monkeypatch, on_call)
    return seen


def test_collective_run_equals_the_object_store_run_and_puts_no_snapshot(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from actors.learner_group import LearnerGroup
    from orchestrator.weight_sync import WeightSync

    puts = _count(LearnerGroup, "publish_for_rollout", monkeypatch)
    retained = _count(LearnerGroup, "publish_retained", monkeypatch)
    connects = _count(WeightSync, "connect", monkeypatch)
    broadcasts = _count(WeightSync, "broadcast", monkeypatch)
    summary = run_faulty(tmp_path, policy, steps=3, extra=COLLECTIVE)

    assert summary["steps"] == 3 and summary["weights_in_sync"] is True
    assert puts[0] == 0 and retained[0] == 0  # nothing went through the object store
    assert connects[0] == 1 and broadcasts[0] == 4  # one group; before training and after each step
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)
    assert_same_steps(tmp_path, baseline, range(1, 4))


def test_generator_killed_between_or_during_syncs_rejoins_a_new_group(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 2's preview: the replica dies with its request, comes back without weights and loads learner rank
    0's retained broadcast from the object store. The sync after step 2: it dies just before the broadcast,
    which fails on both sides and is retried in a group formed with the restarted process."""
    from actors.learner_group import LearnerGroup
    from orchestrator.rollout import GeneratorPool
    from orchestrator.weight_sync import WeightSync

    kills: list[str] = []
    pids: list[int] = []

    def on_collect(n: int, pool: GeneratorPool, args: tuple[Any, ...]) -> None:
        if n == 3:  # call 0 is the evaluation before training, then preview and final of each step
            pids.append(_actor_pid(pool.handles[0]))
            os.kill(pids[-1], signal.SIGKILL)
            kills.append("mid-generation")

    broadcast_calls = itertools.count()
    original = WeightSync.broadcast

    def broadcast(self: WeightSync, **kwargs: Any) -> Any:
        if next(broadcast_calls) == 3:  # after step 2 (0 is before training)
            pids.append(_actor_pid(self._receivers[0]))
            _sigkill_and_wait(pids[-1])
            kills.append("before the broadcast")
        return original(self, **kwargs)

    _calls(GeneratorPool, "_collect", monkeypatch, on_collect)
    monkeypatch.setattr(WeightSync, "broadcast", broadcast)
    retained = _count(LearnerGroup, "publish_retained", monkeypatch)
    connects = _count(WeightSync, "connect", monkeypatch)
    summary = run_faulty(tmp_path, policy, steps=3, extra=COLLECTIVE)

    assert kills == ["mid-generation", "before the broadcast"]
    assert retained[0] == 1  # the replica that died mid-generation reloaded from the retained copy
    # at the start, after the first restart, after the failed broadcast (and a try while it restarts)
    assert connects[0] >= 3
    assert summary["steps"] == 3 and summary["weights_in_sync"] is True
    assert summary["generator"]["restarts"] >= 2
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)
    assert_same_steps(tmp_path, baseline, range(1, 4))


def test_generator_dying_as_the_group_forms_is_retried_after_the_rendezvous_timeout(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generator answers the liveness check, then dies before its join: learner rank 0 waits in the
    rendezvous only `resources.weight_rendezvous_s` (not `learner.timeout_s`, 600 s), and the group is
    formed again with the restarted process."""
    from orchestrator.weight_sync import WeightSync

    pids: list[int] = []
    seconds: list[float] = []
    original = WeightSync.connect
    join = WeightSync._join

    def connect(self: WeightSync, *args: Any) -> None:
        t0 = time.monotonic()
        try:
            original(self, *args)
        finally:
            seconds.append(time.monotonic() - t0)

    def join_after_a_death(self: WeightSync, members: list[Any], *args: Any) -> None:
        if not pids:  # the first group: its members all answered weights_group a moment ago
            pids.append(_actor_pid(members[1]))
            _sigkill_and_wait(pids[-1])
        join(self, members, *args)

    monkeypatch.setattr(WeightSync, "connect", connect)
    monkeypatch.setattr(WeightSync, "_join", join_after_a_death)
    summary = run_faulty(tmp_path, policy, steps=3, extra=(*COLLECTIVE, "resources.weight_rendezvous_s=5"))

    assert len(pids) == 1 and summary["generator"]["restarts"] >= 1
    assert len(seconds) >= 2 and all(s < 60 for s in seconds), seconds  # the failed one included
    assert summary["steps"] == 3 and summary["weights_in_sync"] is True
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)
    assert_same_steps(tmp_path, baseline, range(1, 4))


def test_learner_rank_killed_restores_and_broadcasts_from_the_new_rank(
    baseline: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.weight_sync import WeightSync

    pids: list[int] = []
    killed = forward_backward_of(2)
    _kill_rank0_on(killed, monkeypatch, pids)
    connects = _count(WeightSync, "connect", monkeypatch)
    summary = run_faulty(tmp_path, policy, steps=3, extra=COLLECTIVE)

    assert summary["counters"]["learner_restores"] == 1 and summary["steps"] == 3
    assert pids[0] == pids[killed] != pids[-1]
    assert connects[0] == 2  # the restarted rank 0 is a new source: a new group
    assert summary["weights_in_sync"] is True
    assert_same_steps(tmp_path, baseline, range(1, 4))
    assert rollouts(tmp_path, 3) == rollouts(baseline, 3)


def test_async_mode_broadcasts_between_the_groups_in_flight(
    ray_cluster: object, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Async mode samples in a producer thread while the learner trains: the broadcast takes the pool's lock
    as an object-store load does, so no group mixes versions."""
    from actors.learner_group import LearnerGroup

    puts = _count(LearnerGroup, "publish_for_rollout", monkeypatch)
    summary = run_faulty(tmp_path, policy, steps=3, extra=(*ASYNC, *COLLECTIVE))

    assert summary["steps"] == 3 and summary["weights_in_sync"] is True and puts[0] == 0
    rows = step_rows(tmp_path)
    assert all(rows[s]["learner/loss"] is not None for s in range(1, 4)), rows
