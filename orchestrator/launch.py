"""From a loaded recipe to a finished run: input checks, dry run, cluster, run directory, controller.

Everything that can be wrong with the input is checked before any actor starts, and reported as
`BadInput` (the CLI exits 2): missing weight or data paths, resources the cluster does not have.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig, dump_config, load_recipe
from orchestrator.schema import ConfigError

log = logging.getLogger(__name__)


class BadInput(ValueError):
    """The recipe asks for something that does not exist here; the message names the field."""


def _path_fields(cfg: RunConfig) -> dict[str, tuple[Any, str]]:
    """Every local path a recipe can name, by dotted field: (the object holding it, its attribute or key)."""
    fields: dict[str, tuple[Any, str]] = {
        "model.pretrained": (cfg.model, "pretrained"),
        "codec.text_encoder_path": (cfg.codec, "text_encoder_path"),
        "codec.image_codec_path": (cfg.codec, "image_codec_path"),
    }
    fields.update({f"data.{k}": (cfg.data, k) for k in cfg.data.paths()})
    for i, spec in enumerate(cfg.rewards):
        for key in ("token_file", "tls_ca", "python"):
            fields[f"rewards[{i}].{key}"] = (spec, key)
        if isinstance(spec.scorer_kwargs.get("weights"), str):
            fields[f"rewards[{i}].scorer_kwargs.weights"] = (spec.scorer_kwargs, "weights")
    return fields


def _get(owner: Any, key: str) -> Any:
    return owner.get(key) if isinstance(owner, dict) else getattr(owner, key)


def rebase_paths(cfg: RunConfig, roots: list[Path]) -> RunConfig:
    """Make every relative local path in `cfg` (and run.init_from) absolute, in place: relative to the first
    of `roots` under which it exists, else to the first root (where check_paths then names it).

    A run's saved config.yaml holds paths relative to the folder the run started in; rebased on that folder
    they hold from anywhere (`sana-rl eval RUN` from another folder)."""
    fields = _path_fields(cfg)
    fields["run.init_from"] = (cfg.run, "init_from")
    for owner, key in fields.values():
        value = _get(owner, key)
        if not value or Path(value).expanduser().is_absolute():
            continue
        found = next((root / value for root in roots if (root / value).exists()), roots[0] / value)
        if isinstance(owner, dict):
            owner[key] = str(found)
        else:
            setattr(owner, key, str(found))
    return cfg


def check_paths(cfg: RunConfig) -> None:
    """Every local path the recipe names must exist (weights are never downloaded)."""
    for name, (owner, key) in _path_fields(cfg).items():
        value = _get(owner, key)
        if value and not Path(value).exists():
            raise BadInput(f"{name}: {value} does not exist")
    if cfg.codec.text_encoder == "gemma" and not cfg.codec.text_encoder_path:
        raise BadInput("codec.text_encoder_path: gemma needs a local path")
    if cfg.codec.image_codec == "dcae" and not cfg.codec.image_codec_path:
        raise BadInput("codec.image_codec_path: dcae needs a local path")


def launch(cfg: RunConfig, *, recipe: Path, dry_run: bool = False, resume: bool | None = None) -> int:
    """Run `cfg` (and, first, the recipe it starts from when that has not finished). Returns 0."""
    from orchestrator.placement import describe, plan_for

    base_retrained = False
    if cfg.run.init_recipe:
        base = load_recipe(recipe.parent / cfg.run.init_recipe)
        if dry_run:
            print(f"# first: {cfg.run.init_recipe} (skipped when it has finished)")
        elif _finished(base) and not changed_settings(base):
            print(f"== {base.run.name}: finished earlier, reusing {base.output_dir}")
        else:  # a finished stage made from another version of its recipe is set aside by this launch
            print(f"== stage 1: {base.run.name} ({base.run.mode}) from {cfg.run.init_recipe}")
            launch(base, recipe=recipe.parent / cfg.run.init_recipe, resume=resume)
            base_retrained = True
        if cfg.run.init_from is None:
            cfg.run.init_from = str(base.output_dir)
    if cfg.run.init_from and not dry_run:
        cfg.model.pretrained = str(init_weights(Path(cfg.run.init_from)))
    try:
        check_paths(cfg)
    except BadInput as exc:
        if not dry_run:
            raise
        print(f"warning: {exc} (a real run stops here with exit status 2)")
    plan = plan_for(cfg)
    if dry_run:
        print(describe(plan))
        print(dump_config(cfg))
        return 0
    connect_cluster(cfg)
    try:
        import ray

        from orchestrator.placement import check_feasible

        try:
            check_feasible(plan, ray.cluster_resources())
        except ConfigError as exc:
            raise BadInput(str(exc)) from None
        run_dir = cfg.output_dir
        if why := _outdated(cfg, base_retrained):  # a result: kept aside, and this run made afresh
            print(f"== {cfg.run.name}: {why}; moved {run_dir} to {_set_aside(run_dir)}")
        run_dir.mkdir(parents=True, exist_ok=True)
        from orchestrator.controller import Controller, latest_checkpoint

        if resume is None:  # default: continue when there is a complete checkpoint
            resume = latest_checkpoint(run_dir) is not None
        if resume:
            check_resumable(cfg)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        print(f"== {cfg.run.name}: {cfg.run.mode}, {cfg.run.steps} steps -> {run_dir}")
        summary = Controller(cfg, run_dir).run(resume=resume)
        print_summary(cfg, summary, run_dir, random_start=cfg.model.pretrained is None)
        return 0
    finally:
        disconnect_cluster(cfg)


def init_weights(path: Path) -> Path:
    """`run.init_from` names a finished run directory (its diffusers export) or a diffusers directory.
    Only weights carry over: the new run gets a fresh optimizer and its own learning rate."""
    for candidate in (path / "export", path):
        if (candidate / "config.json").exists():
            return candidate
    raise BadInput(f"run.init_from: {path} holds neither export/config.json nor config.json")


def _outdated(cfg: RunConfig, base_retrained: bool) -> str:
    """Why the run directory holds a result this launch must not continue, or ''. A finished run made from
    another version of the recipe, or any run started from a stage that has just been trained again."""
    if base_retrained and (cfg.output_dir / "config.yaml").exists():
        return f"it started from the earlier {cfg.run.init_recipe}, trained again just now"
    if _finished(cfg) and (changed := changed_settings(cfg)):
        return f"the recipe changed since it finished ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''})"
    return ""


def _finished(cfg: RunConfig) -> bool:
    return (cfg.output_dir / "summary.json").exists()


RESUMABLE_EDITS = (
    "run.steps", "run.eval_every", "run.checkpoint_every", "run.max_restores", "run.on_learner_failure",
    "run.max_skip_rate", "learner.optim.decay_steps", "resources.", "eval.",
)  # fmt: skip
"""Keys a resumed run may change: how long it runs (a schedule that follows run.steps stretches with it),
how it is checked, evaluated and placed. Anything else would silently train a different run on."""


def check_resumable(cfg: RunConfig) -> None:
    """Refuse to resume a run directory whose saved recipe differs from `cfg` beyond RESUMABLE_EDITS."""
    if not (cfg.output_dir / "config.yaml").exists():  # nothing saved to differ from
        return
    changed = [k for k in changed_settings(cfg) if not k.startswith(RESUMABLE_EDITS)]
    if changed:
        shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise BadInput(
            f"run.output_dir: {cfg.output_dir} holds a run made with other settings ({shown}); resuming would "
            "train it on under the new ones. Restore those settings to resume it, or set another "
            "run.output_dir to start afresh."
        )


def changed_settings(cfg: RunConfig) -> list[str]:
    """Dotted keys whose value in `cfg` differs from the config its finished run saved. Cluster and logging
    settings do not change what a run makes, so they do not count; nor do the keys `launch` fills in before
    saving (run.init_from from run.init_recipe, model.pretrained from run.init_from)."""
    import yaml

    saved_path = cfg.output_dir / "config.yaml"
    saved = _flatten(yaml.safe_load(saved_path.read_text())) if saved_path.exists() else {}
    now = _flatten(yaml.safe_load(dump_config(cfg)))
    filled = {"run.init_from"} if cfg.run.init_recipe and cfg.run.init_from is None else set()
    if cfg.run.init_recipe or cfg.run.init_from:
        filled.add("model.pretrained")

    def differs(key: str) -> bool:
        if key in saved:
            return bool(saved[key] != now.get(key))
        # a setting added to the schema since the run saved its config: only a non-default value is an edit
        return bool(now.get(key) != _schema_default(cfg, key))

    return sorted(
        k
        for k in saved.keys() | now.keys()
        if differs(k) and k not in filled and not k.startswith(("cluster.", "logging."))
    )


def _schema_default(cfg: RunConfig, dotted: str) -> Any:
    """The saved form of the value a recipe gets for `dotted` by leaving it out; a fresh object (equal to
    nothing saved) where the setting has no default or is not a dataclass field."""
    import dataclasses

    from orchestrator.schema import to_dict

    *parents, name = dotted.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part, None)
    if not dataclasses.is_dataclass(obj):
        return object()
    for f in dataclasses.fields(obj):
        if f.name == name and f.default is not dataclasses.MISSING:
            return to_dict(f.default)
        if f.name == name and f.default_factory is not dataclasses.MISSING:
            return to_dict(f.default_factory())
    return object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}


def _set_aside(run_dir: Path) -> Path:
    """Rename a run directory out of the way (never deleted): run_dir.stale-1, -2, ..."""
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.stale-{n}")).exists():
        n += 1
    run_dir.rename(aside)
    return aside


_STARTED_HERE: list[bool] = []


def connect_cluster(cfg: RunConfig) -> None:
    import ray

    from orchestrator.cluster import connect

    if ray.is_initialized():
        _STARTED_HERE.append(False)
        return
    connect(cfg.cluster)  # an embedded loopback cluster, or the one at cluster.address / RAY_ADDRESS
    _STARTED_HERE.append(True)


def disconnect_cluster(cfg: RunConfig) -> None:
    import ray

    if _STARTED_HERE and _STARTED_HERE.pop():
        ray.shutdown()


def print_summary(
    cfg: RunConfig,
    summary: dict[str, Any],
    run_dir: Path,
    outputs: str = "samples/*.png, metrics.jsonl, reward_curve.png, config.yaml, checkpoints/",
    *,
    random_start: bool,
) -> None:
    """The table a run ends with: evaluation before and after, steps, wall time, outputs.
    `random_start`: "before" measured the seeded initialisation (pretraining), not trained weights."""
    from rich.console import Console
    from rich.table import Table

    before, after = summary.get("before", {}), summary.get("after", {})
    table = Table(title=f"{cfg.run.name} ({cfg.run.mode})")
    table.add_column("metric")
    # a run from random weights measures its start too; say so, or pretraining's 0.000 reads like a bug
    table.add_column("before (random init)" if random_start else "before", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        table.add_row(key, "-" if b is None else f"{b:.3f}", "-" if a is None else f"{a:.3f}")
    table.add_row("steps", "", str(summary["steps"]))
    table.add_row("wall time", "", f"{summary['wall_s']:.0f} s")
    console = Console()
    console.print(table)
    console.print(f"outputs: {run_dir}/ ({outputs})")
