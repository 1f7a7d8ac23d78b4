"""Every shipped recipe loads strictly, and the CLI reports bad recipes with exit status 2."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import load_recipe
from orchestrator.schema import ConfigError

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))


def test_there_are_recipes_for_every_mode() -> None:
    modes = {load_recipe(p).run.mode for p in RECIPES}
    assert modes == {"pretrain", "sft", "sol_rl", "grpo", "dpo"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_is_submittable(path: Path) -> None:
    cfg = load_recipe(path)
    assert cfg.run.name
    # `ray job submit -- recipes/x.yaml` executes the file: it needs the shebang and the run bit.
    assert path.read_text().startswith("#!/usr/bin/env -S python -m orchestrator run\n")
    assert os.stat(path).st_mode & stat.S_IXUSR


def test_check_recipe_accepts_every_shipped_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-recipe", *map(str, RECIPES)]) == 0
    assert capsys.readouterr().out.count("ok: ") == len(RECIPES)


def test_misspelt_key_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    text = (RECIPES[0].parent / "tiny.yaml").read_text().replace("  keep: 8", "  kepe: 8")
    bad.write_text(text)
    assert main(["check-recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rollout.kepe: unknown key" in err


def test_set_overrides_apply_and_are_type_checked(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = str(RECIPES[0].parent / "tiny.yaml")
    cfg = load_recipe(tiny, ["learner.optim.lr=1e-5", "rollout.keep=4"])
    assert cfg.learner.optim.lr == pytest.approx(1e-5) and cfg.rollout.keep == 4
    assert main(["check-recipe", tiny, "--set", "learner.optim.lr=fast"]) == 2
    assert "learner.optim.lr: expected float, got 'fast'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"rollout\.keep: 20 is more than num_seeds 16"):
        load_recipe(tiny, ["rollout.keep=20"])


def test_run_rejects_missing_weights_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = str(RECIPES[0].parent / "tiny.yaml")
    code = main(
        ["run", tiny, "--set", "model.pretrained=/nonexistent/weights", "--set", "run.init_recipe=null"]
    )
    assert code == 2
    assert "model.pretrained: /nonexistent/weights does not exist" in capsys.readouterr().err


def test_dry_run_prints_plan_memory_and_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(RECIPES[0].parent / "sol_rl.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning: model.pretrained: /models/" in out  # weights are not on this machine
    assert "learner" in out and "generator" in out and "GiB" in out
    assert "mode: sol_rl" in out and "num_seeds: 96" in out


def test_a_finished_stage_made_from_another_recipe_version_is_detected_and_set_aside(tmp_path: Path) -> None:
    """`make demo` reuses a finished pretraining only while tiny_pretrain.yaml still says what made it."""
    from orchestrator.config import dump_config
    from orchestrator.launch import _set_aside, changed_settings

    recipe = RECIPES[0].parent / "tiny_pretrain.yaml"
    cfg = load_recipe(recipe, [f"run.output_dir={tmp_path / 'pre'}"])
    cfg.output_dir.mkdir()
    (cfg.output_dir / "config.yaml").write_text(dump_config(cfg))
    assert changed_settings(cfg) == []
    moved = load_recipe(recipe, [f"run.output_dir={tmp_path / 'pre'}", "cluster.num_cpus=2"])
    assert changed_settings(moved) == []  # where it runs does not change what it makes
    edited = load_recipe(
        recipe, [f"run.output_dir={tmp_path / 'pre'}", "learner.optim.lr=5e-4", "run.steps=90"]
    )
    assert changed_settings(edited) == ["learner.optim.decay_steps", "learner.optim.lr", "run.steps"]

    # A run saved before a setting existed: the setting at its default is no edit, at another value it is.
    (cfg.output_dir / "config.yaml").write_text(dump_config(cfg).replace("    updates: 0\n", ""))
    assert "updates" not in (cfg.output_dir / "config.yaml").read_text()
    assert changed_settings(cfg) == []
    later = load_recipe(recipe, [f"run.output_dir={tmp_path / 'pre'}", "rollout.replay.updates=2"])
    assert changed_settings(later) == ["rollout.replay.updates"]
    (cfg.output_dir / "config.yaml").write_text(dump_config(cfg))

    # A stage that itself starts from another: launch fills run.init_from and model.pretrained in before
    # saving, and those must not read as edits.
    chained = load_recipe(RECIPES[0].parent / "tiny.yaml", [f"run.output_dir={tmp_path / 'rl'}"])
    chained.output_dir.mkdir()
    filled = load_recipe(RECIPES[0].parent / "tiny.yaml", [f"run.output_dir={tmp_path / 'rl'}"])
    filled.run.init_from, filled.model.pretrained = "runs/tiny-pretrain", "runs/tiny-pretrain/export"
    (chained.output_dir / "config.yaml").write_text(dump_config(filled))
    assert changed_settings(chained) == []

    assert _set_aside(cfg.output_dir) == tmp_path / "pre.stale-1"
    cfg.output_dir.mkdir()
    assert _set_aside(cfg.output_dir) == tmp_path / "pre.stale-2"
    assert (tmp_path / "pre.stale-1" / "config.yaml").exists() and not cfg.output_dir.exists()


def test_resuming_under_changed_settings_is_refused_naming_them(tmp_path: Path) -> None:
    """A run may be resumed to run longer, or evaluated and placed differently, but not with another
    learning rate or model: that would train a different run on from its checkpoint, silently."""
    from orchestrator.config import dump_config
    from orchestrator.launch import BadInput, check_resumable

    recipe = RECIPES[0].parent / "tiny_pretrain.yaml"
    out = f"run.output_dir={tmp_path / 'run'}"
    cfg = load_recipe(recipe, [out])
    check_resumable(cfg)  # no run there yet: nothing to differ from
    cfg.output_dir.mkdir()
    (cfg.output_dir / "config.yaml").write_text(dump_config(cfg))
    check_resumable(cfg)
    check_resumable(
        load_recipe(recipe, [out, "run.steps=900", "eval.seeds_per_prompt=4", "cluster.num_cpus=2"])
    )
    with pytest.raises(
        BadInput, match=r"run.output_dir: .* other settings \(learner.optim.lr, model.overrides"
    ):
        check_resumable(
            load_recipe(recipe, [out, "learner.optim.lr=5e-4", "model.overrides={patch_size: 2}"])
        )

    # A finished run is a result: edited afterwards, it is set aside and made afresh (not refused), as is
    # any run whose starting stage has just been trained again.
    from orchestrator.launch import _outdated

    assert _outdated(cfg, base_retrained=False) == ""
    (cfg.output_dir / "summary.json").write_text("{}")
    edited = load_recipe(recipe, [out, "learner.optim.lr=5e-4"])
    assert (
        _outdated(edited, base_retrained=False) == "the recipe changed since it finished (learner.optim.lr)"
    )
    assert _outdated(cfg, base_retrained=False) == ""
    assert "trained again" in _outdated(cfg, base_retrained=True)


def test_eval_refuses_what_is_not_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((RECIPES[0].parent / "tiny.yaml").read_text())
    assert main(["eval", str(run)]) == 2  # still training: no summary yet
    assert "has not finished" in capsys.readouterr().err
    (run / "summary.json").write_text('{"steps": 3}')
    assert main(["eval", str(run), "--seeds-per-prompt", "0"]) == 2  # checked by the recipe's schema
    assert "eval.seeds_per_prompt: must be >= 1" in capsys.readouterr().err
    assert main(["eval", str(run)]) == 2  # finished, but nothing was exported
    assert "export/config.json" in capsys.readouterr().err


def test_summary_table_says_when_before_is_the_random_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.launch import print_summary

    summary = {"before": {"composition": 0.0}, "after": {"composition": 0.474}, "steps": 800, "wall_s": 234.0}
    cfg = load_recipe(RECIPES[0].parent / "tiny_pretrain.yaml")
    print_summary(cfg, summary, tmp_path, random_start=True)  # pretraining from random weights
    out = capsys.readouterr().out
    assert "before (random init)" in out and "0.474" in out
    print_summary(cfg, summary, tmp_path, random_start=False)  # an RL stage from trained weights
    out = capsys.readouterr().out
    assert "before" in out and "random init" not in out
