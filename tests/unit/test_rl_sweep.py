"""scripts/rl_sweep.py reads a recipe or a run's saved config with the data paths a real run would use."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from orchestrator.config import dump_config, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rl_sweep", ROOT / "scripts" / "rl_sweep.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_recipe_paths_resolve_from_its_folder_and_saved_config_paths_from_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_config = _script().load_config
    # From the repository root, the demo's recipe names data/... beside itself (recipes/data), not ./data.
    monkeypatch.chdir(ROOT)
    cfg = load_config(Path("recipes/tiny.yaml"), ["run.seed=3"])
    assert cfg.run.seed == 3
    assert Path(cfg.data.prompts) == Path("recipes/data/shapes_rl_prompts.parquet")
    assert Path(cfg.data.prompts).exists() and Path(cfg.data.eval_prompts).exists()

    # A run saves its config with the paths as resolved where it started (here "recipes/data/..."): read
    # from there, they stay relative to the working directory, not to the run directory.
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(load_recipe(Path("recipes/tiny.yaml"))))
    (run_dir / "metrics.jsonl").write_text("")
    saved = load_config(run_dir / "config.yaml", [])
    assert saved.data.prompts == str(ROOT / "recipes" / "data" / "shapes_rl_prompts.parquet")
