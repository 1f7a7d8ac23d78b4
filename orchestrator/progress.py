"""A live progress line (stage, step, reward, images/s, ETA) on a terminal; silent otherwise."""

from __future__ import annotations

import sys
from typing import Any

from orchestrator.metrics import LoggingConfig


class Progress:
    """rich progress bar driven by the controller's step metrics."""

    def __init__(self, cfg: LoggingConfig, *, total: int, stage: str) -> None:
        self._bar: Any = None
        if cfg.progress and sys.stdout.isatty():
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.fields[stage]}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("run", total=total, stage=stage, info="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        parts = []
        for key, label in (
            ("final/reward_mean", "reward"),
            ("learner/loss", "loss"),
            ("final/images_per_s", "img/s"),
        ):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.3f}")
        self._bar.update(self._task, completed=step, info="  ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
