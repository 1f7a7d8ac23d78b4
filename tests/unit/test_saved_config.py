"""A run's saved config.yaml reads from any folder: `sana-rl eval RUN` and scripts/rl_sweep.py take its
relative paths from the folder the run started in, not from wherever they are called."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.config import dump_config, load_recipe
from orchestrator.evaluate import saved_config
from orchestrator.launch import check_paths

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder holding the demo recipe, its prompt files and a finished run started there with
    relative paths (runs/tiny, made from the weights in runs/tiny-pretrain/export)."""
    proj = tmp_path / "proj"
    (proj / "recipes" / "data").mkdir(parents=True)
    shutil.copy(RECIPES / "tiny.yaml", proj / "recipes")
    for name in ("shapes_rl_prompts.parquet", "shapes_eval_prompts.parquet"):
        shutil.copy(RECIPES / "data" / name, proj / "recipes" / "data")
    (proj / "runs" / "tiny-pretrain" / "export").mkdir(parents=True)
    monkeypatch.chdir(proj)
    cfg = load_recipe(Path("recipes/tiny.yaml"), ["model.pretrained=runs/tiny-pretrain/export"])
    assert cfg.data.prompts == "recipes/data/shapes_rl_prompts.parquet"  # saved relative, as a run saves it
    (proj / "runs" / "tiny").mkdir()
    (proj / "runs" / "tiny" / "config.yaml").write_text(dump_config(cfg))
    return proj


def test_saved_paths_resolve_from_the_folder_the_run_started_in(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = saved_config(Path("../proj/runs/tiny"), ["eval.seed=7"])
    assert cfg.eval.seed == 7
    assert cfg.data.prompts == str(project / "recipes" / "data" / "shapes_rl_prompts.parquet")
    assert cfg.data.eval_prompts == str(project / "recipes" / "data" / "shapes_eval_prompts.parquet")
    assert cfg.model.pretrained == str(project / "runs" / "tiny-pretrain" / "export")
    check_paths(cfg)  # every path exists from here


def test_a_copied_run_directory_falls_back_to_the_current_folder(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # archived under another root, the run's own start folder no longer holds its data: the cwd does
    archive = tmp_path / "archive" / "runs" / "tiny"
    shutil.copytree(project / "runs" / "tiny", archive)
    cfg = saved_config(archive)
    assert cfg.data.prompts == str(project / "recipes" / "data" / "shapes_rl_prompts.parquet")
    # a path found under neither is named against the run's start folder, and check_paths names the field
    monkeypatch.chdir(tmp_path)
    cfg = saved_config(archive)
    assert cfg.data.prompts == str(tmp_path / "archive" / "recipes" / "data" / "shapes_rl_prompts.parquet")
    with pytest.raises(ValueError, match=r"model\.pretrained: .*archive/runs/tiny-pretrain/export does not"):
        check_paths(cfg)


def test_not_a_run_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"RUN_DIR: .* holds no config\.yaml"):
        saved_config(tmp_path)
