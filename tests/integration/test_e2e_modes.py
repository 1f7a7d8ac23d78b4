"""Each mode end to end on a local Ray cluster with the tiny preset and a reward served over gRPC."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.soak import SMALL_RL
from orchestrator.config import load_recipe
from orchestrator.launch import launch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SMALL = [
    "run.steps=2",
    "run.checkpoint_every=1",
    "run.init_recipe=null",
    "eval.num_prompts=2",
    "eval.seeds_per_prompt=1",
    "eval.steps=3",
    "logging.wandb=disabled",
    "logging.progress=false",
]
RL = list(SMALL_RL)
ONE_THREAD = ["resources.generator_threads=1", "learner.num_threads=1"]
"""Three runs in one test: on a busy 2-core machine two OpenMP threads per actor wait on each other."""


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.soak import random_policy as save_random_policy

    return save_random_policy(tmp_path_factory.mktemp("policy"))


def _run(tmp_path: Path, recipe: str, extra: list[str]) -> dict[str, object]:
    cfg = load_recipe(RECIPES / recipe, [*SMALL, f"run.output_dir={tmp_path / 'run'}", *extra])
    assert launch(cfg, recipe=RECIPES / recipe) == 0
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def _check_artifacts(run: Path, *, rl: bool) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learner/loss" in r]
    assert len(steps) >= 2 and all(math.isfinite(float(r["learner/loss"])) for r in steps)  # type: ignore[arg-type]
    assert (run / "samples" / "before.png").exists() and (run / "samples" / "after.png").exists()
    assert (run / "config.yaml").exists() and (run / "reward_curve.png").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert (run / "export" / "config.json").exists()
    if rl:
        assert any(math.isfinite(float(r.get("final/reward_mean") or "nan")) for r in steps) or any(  # type: ignore[arg-type]
            math.isfinite(float(r.get("preview/reward_mean") or "nan"))
            for r in steps  # type: ignore[arg-type]
        )
        assert list((run / "rollouts").glob("part-*.parquet"))
        _check_rates(run, steps)
    return rows


def _check_rates(run: Path, steps: list[dict[str, object]]) -> None:
    """Each stage's images/s is that step's own rate: its images over its share of the generation time."""
    from orchestrator.rollout_log import read_rollout_log

    log = read_rollout_log(run / "rollouts").to_pylist()
    for row in steps:
        spent = 0.0
        for stage in ("preview", "final"):
            n = sum(1 for r in log if r["step"] == row["step"] and r["stage"] == stage)
            if f"{stage}/images_per_s" in row:
                spent += n / float(row[f"{stage}/images_per_s"])  # type: ignore[arg-type]
        assert 0 < spent <= float(row["time/generate_s"]) * 1.01, row  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("recipe", "mode", "extra"),
    [
        # The generator samples through torch.compile (Inductor's C++ backend here) in one mode.
        ("tiny.yaml", "sol_rl", ["rollout.compile=true"]),
        # the demo recipe's best-sample replay belongs to sol_rl: the other modes turn it off
        ("tiny.yaml", "grpo", ["run.mode=grpo", "loss.grpo.noise_level=0.7", "rollout.replay.weight=0"]),
        ("tiny.yaml", "dpo", ["run.mode=dpo", "rollout.replay.weight=0"]),
    ],
)
def test_rl_mode_end_to_end(
    ray_cluster: object, random_policy: Path, tmp_path: Path, recipe: str, mode: str, extra: list[str]
) -> None:
    # JPEG size varies with any image, so every group carries signal from the first step.
    reward = "rewards=[{name: jpeg, scorer: jpeg_compressibility}]"
    summary = _run(tmp_path, recipe, [*RL, *extra, reward, f"model.pretrained={random_policy}"])
    assert summary["steps"] == 2
    assert summary["weights_in_sync"] is True  # generators hold exactly the learner's rollout weights
    _check_artifacts(tmp_path / "run", rl=True)


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_dataset_mode_end_to_end(ray_cluster: object, tmp_path: Path, mode: str) -> None:
    summary = _run(
        tmp_path,
        "tiny_pretrain.yaml",
        [
            f"run.mode={mode}",
            "learner.batch_size=8",
            "learner.micro_batch_size=8",
            "learner.optim.warmup_steps=1",
            "loss.fm.caption_dropout=0.5",
        ],
    )
    assert summary["steps"] == 2 and summary["weights_in_sync"] is None  # no generators in these modes
    rows = _check_artifacts(tmp_path / "run", rl=False)
    dropped = [float(r["data/captions_dropped"]) for r in rows if "data/captions_dropped" in r]  # type: ignore[arg-type]
    assert len(dropped) == 2 and 0 < sum(dropped) < 16  # 2 steps of 8 captions, each dropped with p 0.5


def test_async_never_trains_on_rollouts_beyond_max_staleness(
    ray_cluster: object, random_policy: Path, tmp_path: Path
) -> None:
    reward = "rewards=[{name: jpeg, scorer: jpeg_compressibility}]"
    extra = ["pipeline.enabled=true", "pipeline.max_staleness=1", "pipeline.buffer_size=2", "run.steps=4"]
    summary = _run(tmp_path, "tiny.yaml", [*RL, reward, f"model.pretrained={random_policy}", *extra])
    assert summary["steps"] == 4 and summary["weights_in_sync"] is True
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "staleness" in r and "learner/loss" in r]
    assert len(trained) == 4
    assert all(0 <= r["staleness"] <= 1 for r in trained)
    # the learner's step-1 batch was sampled by version 0 while it produced more: overlap happened
    assert max(r["queue_depth"] for r in trained) >= 0


def test_offline_dpo_from_a_preference_dataset(
    ray_cluster: object, random_policy: Path, tmp_path: Path
) -> None:
    """dpo mode with data.preferences: pairs come from a Pick-a-Pic-like parquet, not from sampling."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.shapes_world import encode_png, generate

    scenes = generate(12, seed=3, size=32)
    prefs = tmp_path / "prefs.parquet"
    pq.write_table(
        pa.table(
            {
                "caption": [s.caption() for s in scenes],
                "jpg_0": [encode_png(s.render(32)) for s in scenes],
                "jpg_1": [encode_png(scenes[(i + 1) % 12].render(32)) for i, s in enumerate(scenes)],
                "label_0": [1.0, 0.0, 0.5] * 4,  # a third are ties: skipped and counted
            }
        ),
        prefs,
    )
    reward = "rewards=[{name: jpeg, scorer: jpeg_compressibility}]"
    extra = ["run.mode=dpo", "rollout.replay.weight=0", f"data.preferences={prefs}", "learner.batch_size=4"]
    extra.append(reward)
    summary = _run(tmp_path, "tiny.yaml", [*RL, *extra, f"model.pretrained={random_policy}"])
    assert summary["steps"] == 2 and summary["weights_in_sync"] is True
    rows = _check_artifacts(tmp_path / "run", rl=False)
    trained = [r for r in rows if "learner/loss" in r]
    assert all(r["pairs"] == 4 for r in trained)
    assert abs(trained[0]["learner/loss"] - 0.6931) < 0.05  # policy == reference: -log sigmoid(0)


def test_sol_rl_with_replay_trains_on_its_best_samples_and_resumes_exactly(
    ray_cluster: object, random_policy: Path, tmp_path: Path
) -> None:
    """rollout.replay: each step admits the best sample per prompt, the learner's step adds their
    flow-matching loss and two replay-only updates follow within the step's version; a run resumed from
    step 1's checkpoint (which holds the buffer) takes the same steps 2 and 3 as one that never stopped."""
    reward = "rewards=[{name: jpeg, scorer: jpeg_compressibility}]"
    # every sample qualifies (the demo recipe gates on composition >= 0.6; this test scores JPEG size)
    replay = ["rollout.replay.weight=1.0", "rollout.replay.top_k=1", "rollout.replay.batch_size=4"]
    replay.append("rollout.replay.updates=2")
    replay.append("rollout.replay.min_score=-.inf")
    extra = [*RL, reward, f"model.pretrained={random_policy}", "run.keep_checkpoints=3", *replay, *ONE_THREAD]

    def run(name: str, steps: int) -> list[dict[str, float]]:
        out = tmp_path / name
        cfg = load_recipe(
            RECIPES / "tiny.yaml", [*SMALL, f"run.output_dir={out}", *extra, f"run.steps={steps}"]
        )
        assert launch(cfg, recipe=RECIPES / "tiny.yaml") == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "learner/loss" in r]

    whole = run("whole", 3)
    assert [r["replay/size"] for r in whole] == [2.0, 4.0, 6.0]  # 2 prompts a step, the best of each
    for key in ("replay/loss", "replay/updates_loss"):
        assert all(math.isfinite(r[key]) and r[key] > 0 for r in whole), key
    assert (tmp_path / "whole" / "checkpoints" / "step-0000001" / "replay.pt").exists()
    # three updates a step, one policy version: the published weights are version 3 after 3 steps
    last = json.loads((tmp_path / "whole" / "checkpoints" / "step-0000003" / "controller.json").read_text())
    assert last["version"] == 3

    assert len(run("resumed", 1)) == 1
    # as if stopped after step 1's checkpoint (a finished run under other settings would start afresh)
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed = run("resumed", 3)  # run.steps may grow on resume; it continues from step 1's checkpoint
    assert not list(tmp_path.glob("resumed.stale-*"))
    assert [r["step"] for r in resumed] == [1.0, 2.0, 3.0]
    for got, want in zip(resumed[1:], whole[1:], strict=True):
        for key in ("learner/loss", "replay/loss", "replay/updates_loss", "replay/size", "replay/score"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)
