"""A live progress line on a terminal: stage, step, reward, images/s, loss, ETA. Silent otherwise.

    progress = Progress(cfg.logging, total=cfg.run.steps, stage="sol_rl")
    progress.update(step, metrics)       # after every step
    progress.set_stage("eval")           # while evaluating
    progress.close()

Quiet when `logging.progress` is off or stdout is not a terminal (CI, `ray job submit` logs, pipes), so
logs are not flooded with redraws.
"""

from __future__ import annotations

import sys
from typing import Any

from orchestrator.metrics import LoggingConfig

SHOWN: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("final/reward_mean", "preview/reward_mean", "eval/reward_mean"), "reward", "{:.3f}"),
    (("final/images_per_s", "preview/images_per_s"), "img/s", "{:.1f}"),
    (("learner/loss",), "loss", "{:.4f}"),
)
"""What the line shows: the first of each group of metric keys that the step logged."""


def summary(metrics: dict[str, float]) -> str:
    """`reward 0.412  img/s 35.0  loss 0.0123` from one step's metrics (absent keys left out)."""
    parts = []
    for keys, label, fmt in SHOWN:
        key = next((k for k in keys if k in metrics), None)
        if key is not None:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    return "  ".join(parts)


class Progress:
    """rich progress bar driven by the controller's step metrics; a no-op when quiet."""

    def __init__(self, cfg: LoggingConfig, *, total: int, stage: str, console: Any = None) -> None:
        self._bar: Any = None
        interactive = console.is_terminal if console is not None else sys.stdout.isatty()
        if not (cfg.progress and interactive):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]{task.fields[stage]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("run", total=total, stage=stage, info="")

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=summary(metrics))

    def set_stage(self, stage: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, stage=stage)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


__all__ = ["Progress", "summary"]
