"""Where a run's numbers go: metrics.jsonl in the run directory, wandb, and Ray's Prometheus export.

wandb is offline unless the user has set an API key and asked for `online`: nothing leaves the machine
by default. Ray metrics (`ray.util.metrics`) appear in the dashboard's Prometheus endpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """The recipe's `logging:` section."""

    wandb: Literal["offline", "online", "disabled"] = "offline"
    """online needs WANDB_API_KEY in the environment (never in the recipe)."""
    project: str = "sana-rl"
    entity: str | None = None
    progress: bool = True
    """Live progress display on a terminal (off when stdout is not a TTY)."""
    ray_metrics: bool = True
    """Export gauges through ray.util.metrics (Ray dashboard / Prometheus)."""
    plot_keys: list[str] = field(
        default_factory=lambda: ["final/reward_mean", "eval/reward_mean", "learner/loss"]
    )
    """Curves drawn into reward_curve.png at the end of the run."""


_SECRET_WORDS = ("token", "key", "secret", "password", "api")


def redact(value: Any, key: str = "") -> Any:
    """A copy of a config tree with anything that looks like a secret replaced by '<redacted>'.
    Paths to token files are kept (they are not secrets); inline values are not."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    lowered = key.lower()
    if isinstance(value, str) and any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith("_file"):
        return "<redacted>"
    return value


class MetricsLogger:
    """One step's scalars to every sink; non-finite values are written as null and counted."""

    _GAUGES: ClassVar[dict[str, str]] = {
        "final/images_per_s": "sana_rl_rollout_images_per_s",
        "preview/images_per_s": "sana_rl_preview_images_per_s",
        "final/reward_mean": "sana_rl_reward_mean",
        "time/learn_s": "sana_rl_learner_step_s",
        "time/score_final_s": "sana_rl_reward_latency_s",
        "staleness": "sana_rl_staleness",
        "queue_depth": "sana_rl_queue_depth",
    }

    def __init__(self, cfg: LoggingConfig, run_dir: Path, *, run_name: str) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self.non_finite = 0
        self._wandb: Any = None
        if cfg.wandb != "disabled":
            import wandb

            mode = cfg.wandb if os.environ.get("WANDB_API_KEY") else "offline"
            self._wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, name=run_name, mode=mode, dir=str(run_dir),
                config={"run_dir": str(run_dir)}, reinit="finish_previous",
            )  # fmt: skip
        self._gauges: dict[str, Any] = {}
        if cfg.ray_metrics:
            self._gauges = _ray_gauges(self._GAUGES)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean: dict[str, float | None] = {}
        for k, v in metrics.items():
            f = float(v)
            if math.isfinite(f):
                clean[k] = f
            else:
                clean[k] = None
                self.non_finite += 1
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        finite = {k: v for k, v in clean.items() if v is not None}
        if self._wandb is not None:
            self._wandb.log(finite, step=step)
        for key, gauge in self._gauges.items():
            if key in finite:
                gauge.set(finite[key])

    def log_image(self, name: str, path: Path) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"samples/{name}": wandb.Image(str(path))})

    def log_histogram(self, name: str, values: np.ndarray, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Histogram(values[np.isfinite(values)])}, step=step)

    def close(self) -> None:
        self._file.close()
        if self.cfg.plot_keys:
            plot_curves(self.path, self.run_dir / "reward_curve.png", self.cfg.plot_keys)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _ray_gauges(names: dict[str, str]) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        return {}
    from ray.util.metrics import Gauge

    return {key: Gauge(name, description=f"sana-rl {key}") for key, name in names.items()}


def plot_curves(jsonl: Path, out_png: Path, keys: list[str]) -> Path | None:
    """Line plots of the given keys over steps (matplotlib, Agg); None when none of them was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (key, pts) in zip(axes[0], series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def save_grid(images: np.ndarray, captions: list[str], path: Path, cols: int = 8, scale: int = 3) -> Path:
    """A PNG grid of uint8 [N, H, W, 3] images, upscaled, each with its prompt written under it."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    cell_w, cell_h, text_h = w * scale, h * scale, 30
    grid = Image.new("RGB", (cols * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        x, y = (i % cols) * cell_w, (i // cols) * (cell_h + text_h)
        grid.paste(Image.fromarray(images[i]).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        words, lines = captions[i].split(), [""]
        for word in words:  # wrap to the cell width, two lines at most
            trial = f"{lines[-1]} {word}".strip()
            if draw.textlength(trial, font=font) > cell_w - 4 and lines[-1]:
                lines.append(word)
            else:
                lines[-1] = trial
        draw.multiline_text((x + 2, y + cell_h + 1), "\n".join(lines[:2]), fill="black", font=font, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
