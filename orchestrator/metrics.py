"""Where a run's numbers go: metrics.jsonl in the run directory, wandb, and Ray's Prometheus export; and
the pictures a run leaves behind (curves, sample grids).

wandb is offline unless the user has set WANDB_API_KEY and asked for `online`: nothing leaves the machine
by default, and the config it records is redacted. Ray metrics (`ray.util.metrics`) are exported by the
node's metrics agent (`ray_sana_rl_*` at http://127.0.0.1:<metrics_export_port>/metrics, scraped every
~10 s) when the run is inside Ray. The controller's metric keys they are read from:

    <stage>/images_per_s      -> gauge     sana_rl_rollout_images_per_s{stage}
    <stage>/reward_mean       -> gauge     sana_rl_reward_mean{stage}
    reward/<name>/latency_s   -> histogram sana_rl_reward_latency_seconds{scorer}
    queue_depth               -> gauge     sana_rl_queue_depth      (async buffer; also pipeline/queue_depth)
    staleness                 -> gauge     sana_rl_staleness        (also pipeline/staleness)
    time/learn_s              -> histogram sana_rl_learner_step_seconds
    every logged step         -> counter   sana_rl_steps_total; non-finite values: sana_rl_non_finite_total

Ray 2.60 exports a gauge in the interval after it was set and then leaves it out until it is set again,
so a gauge shows in Prometheus while steps are shorter than the export interval. Histogram sums are
computed from bucket midpoints by Ray; counts are exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """The recipe's `logging:` section."""

    wandb: Literal["offline", "online", "disabled"] = "offline"
    """online needs WANDB_API_KEY in the environment (never in the recipe); without it the run stays
    offline (files under the run directory, `wandb sync` later)."""
    project: str = "sana-rl"
    entity: str | None = None
    jsonl: bool = True
    """Write metrics.jsonl (one JSON object per step) in the run directory."""
    progress: bool = True
    """Live progress display on a terminal (off when stdout is not a TTY)."""
    ray_metrics: bool = True
    """Export gauges, counters and histograms through ray.util.metrics (Ray dashboard / Prometheus)."""
    plot_keys: list[str] = field(default_factory=lambda: ["final/reward_mean", "learner/loss"])
    """Curves drawn into reward_curve.png at the end of the run (reward_mean is the normalised
    combination; raw scores are logged per scorer, e.g. final/composition, eval/composition)."""


# ------------------------------------------------------------------------------------------- secrets
REDACTED = "<redacted>"
_SECRET_WORDS = {
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "key",
    "credential",
    "credentials",
    "auth",
}
_PATH_SUFFIXES = ("_file", "_path", "_dir", "_ca", "_cert")
_PATH_KEYS = {"tls_key"}
"""Keys whose value is the path of a file holding a secret: the path is kept, it is not the secret."""
_SECRET_VALUE = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----|^(sk|hf|ghp|gho|xox[bp])[-_][A-Za-z0-9_-]{8,}|^[0-9a-f]{40}$"
)
"""Values that are secrets wherever they appear: PEM private keys, OpenAI/HF/GitHub/Slack-style tokens,
a 40-hex wandb API key."""


def _secret_key(key: str) -> bool:
    lowered = key.lower()
    if lowered.endswith(_PATH_SUFFIXES) or lowered in _PATH_KEYS:
        return False
    return any(word in _SECRET_WORDS for word in re.split(r"[_\-.\s]+", lowered))


def redact(value: Any, key: str = "") -> Any:
    """A copy of a plain config tree with secrets replaced by '<redacted>': values under secret-looking
    keys (`token`, `api_key`, `wandb_key`, `password`...; paths such as `token_file` are kept) and values
    that look like secrets under any key.

        redact({"rewards": [{"token_file": "/run/tok", "scorer_kwargs": {"api_key": "sk-..."}}]})
        # -> {"rewards": [{"token_file": "/run/tok", "scorer_kwargs": {"api_key": "<redacted>"}}]}
    """
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and ((_secret_key(key) and value) or _SECRET_VALUE.search(value.strip())):
        return REDACTED
    return value


# ------------------------------------------------------------------------------------------ the logger
_RAY_ROUTES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?P<stage>preview|final|eval)/images_per_s"), "sana_rl_rollout_images_per_s"),
    (re.compile(r"(?P<stage>preview|final|eval)/reward_mean"), "sana_rl_reward_mean"),
    (re.compile(r"reward/(?P<scorer>[^/]+)/latency_s"), "sana_rl_reward_latency_seconds"),
    (re.compile(r"(pipeline/)?queue_depth"), "sana_rl_queue_depth"),
    (re.compile(r"(pipeline/)?staleness"), "sana_rl_staleness"),
    (re.compile(r"time/learn_s"), "sana_rl_learner_step_seconds"),
)
_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class RayMetrics:
    """The run's ray.util.metrics instruments, fed from one step's metrics dict."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        def gauge(name: str, doc: str, tags: tuple[str, ...] = ()) -> Any:
            return Gauge(name, description=doc, tag_keys=tags)

        def histogram(name: str, doc: str, tags: tuple[str, ...] = ()) -> Any:
            return Histogram(name, description=doc, boundaries=_SECONDS_BOUNDARIES, tag_keys=tags)

        self.instruments: dict[str, Any] = {
            "sana_rl_rollout_images_per_s": gauge(
                "sana_rl_rollout_images_per_s", "Rollout images/s", ("stage",)
            ),
            "sana_rl_reward_mean": gauge(
                "sana_rl_reward_mean", "Mean reward of the step's batch", ("stage",)
            ),
            "sana_rl_reward_latency_seconds": histogram(
                "sana_rl_reward_latency_seconds", "Reward call latency per scorer", ("scorer",)
            ),
            "sana_rl_queue_depth": gauge("sana_rl_queue_depth", "Async buffer: batches waiting"),
            "sana_rl_staleness": gauge("sana_rl_staleness", "Versions between rollouts and the learner"),
            "sana_rl_learner_step_seconds": histogram("sana_rl_learner_step_seconds", "Learner step time"),
        }
        self.steps = Counter("sana_rl_steps_total", description="Logged steps")
        self.non_finite = Counter("sana_rl_non_finite_total", description="Non-finite metric values")

    def record(self, metrics: dict[str, float], non_finite: int) -> None:
        self.steps.inc()
        if non_finite:
            self.non_finite.inc(non_finite)
        for key, value in metrics.items():
            for pattern, name in _RAY_ROUTES:
                m = pattern.fullmatch(key)
                if m:
                    inst = self.instruments[name]
                    tags = m.groupdict() or None
                    if hasattr(inst, "observe"):
                        inst.observe(value, tags=tags)
                    else:
                        inst.set(value, tags=tags)


class MetricsLogger:
    """One step's scalars to every sink. Non-finite values are never passed on as numbers: the JSON line
    holds null for them and lists their keys under `non_finite`; they are counted."""

    def __init__(
        self, cfg: LoggingConfig, run_dir: Path, *, run_name: str, config: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a") if cfg.jsonl else None
        self.non_finite = 0
        self._wandb: Any = None
        if cfg.wandb != "disabled":
            self._wandb = _start_wandb(cfg, run_dir, run_name, redact(config or {}))
        self._ray: RayMetrics | None = None
        if cfg.ray_metrics:
            import ray

            if ray.is_initialized():
                self._ray = RayMetrics()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        finite: dict[str, float] = {}
        bad: list[str] = []
        for key, value in metrics.items():
            f = float(value)
            if math.isfinite(f):
                finite[key] = f
            else:
                bad.append(key)
        self.non_finite += len(bad)
        if self._file is not None:
            row: dict[str, Any] = {"step": step, **finite, **dict.fromkeys(bad)}
            if bad:
                row["non_finite"] = sorted(bad)
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=step)
        if self._ray is not None:
            self._ray.record(finite, len(bad))

    def drop_after(self, step: int) -> int:
        """Remove the metrics.jsonl rows of steps after `step`: a restored or resumed run logs them again.
        Returns how many went. wandb keeps the first try's points (it ignores steps it has passed)."""
        return self._drop(lambda row: int(row.get("step", -1)) > step)

    def drop_prefix(self, prefix: str, step: int) -> int:
        """Remove the rows of `step` that hold only `prefix` keys (a final evaluation that runs again)."""
        return self._drop(
            lambda row: (
                row.get("step") == step
                and all(k.startswith(prefix) for k in row if k not in ("step", "non_finite"))
            )
        )

    def _drop(self, doomed: Callable[[dict[str, Any]], bool]) -> int:
        """Rewrite metrics.jsonl without the doomed rows, atomically (a crash leaves the old or new file)."""
        if self._file is None:
            return 0
        self._file.close()
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if not doomed(json.loads(line))]
        if len(keep) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self._file = self.path.open("a")
        return len(lines) - len(keep)

    def log_image(self, name: str, path: Path, step: int | None = None) -> None:
        """A saved PNG (e.g. a sample grid) to wandb."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"samples/{name}": wandb.Image(str(path))}, step=step)

    def log_histogram(self, name: str, values: np.ndarray, step: int | None = None) -> None:
        """The distribution of e.g. one step's rewards to wandb (non-finite values left out).

        Without `step` it joins the next `log` call's row: rollouts are scored before their step's
        scalars are logged, and in async mode for a step the logger has not reached yet.
        """
        if self._wandb is not None:
            import wandb

            values = np.asarray(values, dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                row = {name: wandb.Histogram(values.tolist())}
                self._wandb.log(row, commit=False) if step is None else self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.cfg.plot_keys:
                plot_curves(self.path, self.run_dir / "reward_curve.png", self.cfg.plot_keys)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg: LoggingConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> Any:
    import wandb

    mode = cfg.wandb
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("logging.wandb: online needs WANDB_API_KEY in the environment; logging offline instead")
        mode = "offline"
    return wandb.init(
        project=cfg.project, entity=cfg.entity, name=run_name, mode=mode, dir=str(run_dir),
        config=config, reinit="finish_previous",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ pictures
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
    for ax, (key, pts) in zip(axes[0], series.items(), strict=True):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _wrap(caption: str, font: Any, draw: Any, width: int) -> list[str]:
    """Words of `caption` in lines no wider than `width` pixels (a longer single word keeps its line)."""
    lines = [""]
    for word in caption.split():
        trial = f"{lines[-1]} {word}".strip()
        if draw.textlength(trial, font=font) > width and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines


def save_grid(images: np.ndarray, captions: list[str], path: Path, cols: int = 8, scale: int = 3) -> Path:
    """A PNG grid of uint8 [N, H, W, 3] images, upscaled, each with its prompt written under it."""
    from PIL import Image, ImageDraw, ImageFont

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if len(captions) != len(images):
        raise ValueError(f"captions: {len(captions)} for {len(images)} images")
    n, h, w, _ = images.shape
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(c, font, measure, cell_w - 4) for c in captions]
    # The band fits the longest caption: at 96 px "two green circles and a green triangle" takes 3 lines.
    text_h = max(30, 11 * max(len(lines) for lines in wrapped) + 8)
    grid = Image.new("RGB", (cols * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % cols) * cell_w, (i // cols) * (cell_h + text_h)
        grid.paste(Image.fromarray(images[i]).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text(
            (x + 2, y + cell_h + 1), "\n".join(wrapped[i]), fill="black", font=font, spacing=1
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


__all__ = ["LoggingConfig", "MetricsLogger", "RayMetrics", "plot_curves", "redact", "save_grid"]
