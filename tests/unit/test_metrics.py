"""metrics.jsonl with flagged non-finite values, wandb offline with a redacted config, secret redaction,
reward curves and sample grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from orchestrator.metrics import REDACTED, LoggingConfig, MetricsLogger, plot_curves, redact, save_grid

QUIET = LoggingConfig(wandb="disabled", ray_metrics=False, plot_keys=["final/reward_mean"])


def test_jsonl_has_one_object_per_step_and_flags_non_finite_values(tmp_path: Path) -> None:
    logger = MetricsLogger(QUIET, tmp_path, run_name="t")
    logger.log(1, {"final/reward_mean": 0.25, "learner/loss": 1.5})
    logger.log(2, {"final/reward_mean": float("nan"), "learner/loss": float("inf"), "x": 3})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "final/reward_mean": 0.25, "learner/loss": 1.5}
    assert rows[1] == {
        "step": 2, "x": 3.0, "final/reward_mean": None, "learner/loss": None,
        "non_finite": ["final/reward_mean", "learner/loss"],
    }  # fmt: skip
    assert logger.non_finite == 2
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000  # drawn at close


def test_a_rewind_leaves_each_step_once_in_the_jsonl(tmp_path: Path) -> None:
    logger = MetricsLogger(QUIET, tmp_path, run_name="t")
    for step in (1, 2, 3):
        logger.log(step, {"learner/loss": float(step)})
    logger.log(3, {"eval/composition": 0.5})  # the final evaluation, first try
    assert logger.drop_after(1) == 3  # restored to the checkpoint of step 1
    for step in (2, 3):
        logger.log(step, {"learner/loss": 10.0 + step})
    logger.log(3, {"eval/composition": 0.6})
    assert logger.drop_prefix("eval/", 3) == 1  # the final phase runs once more
    logger.log(3, {"eval/composition": 0.7})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "learner/loss": 1.0},
        {"step": 2, "learner/loss": 12.0},
        {"step": 3, "learner/loss": 13.0},
        {"step": 3, "eval/composition": 0.7},
    ]
    assert not list(tmp_path.glob("*.tmp"))


def test_redact_removes_secrets_and_keeps_paths_and_ordinary_values() -> None:
    pem = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----"
    cfg: dict[str, Any] = {
        "run": {"name": "demo", "seed": 0},
        "logging": {"plot_keys": ["final/reward_mean"], "wandb_key": "0123abcd" * 5},
        "codec": {"max_text_tokens": 32},
        "rewards": [
            {
                "name": "vlm", "token_file": "/run/secrets/reward.tok", "tls_key": "/etc/tls/client.key",
                "tls_ca": "/etc/tls/ca.pem", "token": "s3cr3t-inline",
                "scorer_kwargs": {"api_key": "sk-abcdefghij123", "weights": "/models/vlm", "auth": "Bearer x"},
            },
            {"name": "other", "scorer_kwargs": {"extra": "hf_abcdefghijklmnop", "cert_pem": pem}},
        ],
        "note": "0123456789abcdef0123456789abcdef01234567",
    }  # fmt: skip
    out = redact(cfg)
    flat = json.dumps(out)
    for secret in ("0123abcd", "s3cr3t", "sk-abc", "Bearer", "hf_abc", "PRIVATE KEY", "0123456789abcdef"):
        assert secret not in flat, secret
    assert out["rewards"][0]["token_file"] == "/run/secrets/reward.tok"
    assert out["rewards"][0]["tls_key"] == "/etc/tls/client.key"
    assert out["rewards"][0]["scorer_kwargs"]["weights"] == "/models/vlm"
    assert out["rewards"][0]["token"] == REDACTED and out["logging"]["wandb_key"] == REDACTED
    assert out["logging"]["plot_keys"] == ["final/reward_mean"] and out["codec"]["max_text_tokens"] == 32
    assert cfg["rewards"][0]["token"] == "s3cr3t-inline"  # a copy: the input is untouched


def test_wandb_stays_offline_without_a_key_and_records_only_the_redacted_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggingConfig(wandb="online", ray_metrics=False, plot_keys=[])
    logger = MetricsLogger(cfg, tmp_path, run_name="t", config={"rewards": [{"token": "tok-123456"}]})
    logger.log(1, {"final/reward_mean": 0.5})
    logger.log_histogram("final/rewards", np.array([0.1, 0.2, np.nan]), step=1)
    grid = save_grid(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], tmp_path / "g.png")
    logger.log_image("before", grid, step=1)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    written = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())
    assert b"tok-123456" not in written and REDACTED.encode() in written


def test_plot_curves_draws_logged_keys_only(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"step": s, "a": math.sin(s), "b": None}) for s in range(1, 8)))
    assert plot_curves(path, tmp_path / "c.png", ["a", "b"]) == tmp_path / "c.png"
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (450, 320)  # one panel: 'b' was never a number
    assert plot_curves(path, tmp_path / "none.png", ["missing"]) is None


def test_save_grid_writes_each_prompt_under_its_image(tmp_path: Path) -> None:
    images = np.full((3, 16, 16, 3), 200, np.uint8)
    images[1] = [255, 0, 0]
    out = save_grid(images, ["one red circle", "two blue squares", ""], tmp_path / "s" / "grid.png", cols=2)
    with Image.open(out) as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape == (2 * (48 + 30), 2 * 48, 3)
    assert (grid[5, 48 + 5] == [255, 0, 0]).all()  # second image, top-right cell
    text_rows = grid[48 : 48 + 30]
    assert (text_rows[:, :48] < 100).any() and (text_rows[:, 48:] < 100).any()  # captions drawn
    assert not (grid[78 + 48 : 78 + 78, :48] < 100).any()  # empty caption: nothing
    # a caption longer than two lines at the demo's 96 px cells keeps its last words: the band grows
    long = "two green circles and a green triangle"
    out = save_grid(np.full((1, 32, 32, 3), 200, np.uint8), [long], tmp_path / "long.png")
    with Image.open(out) as im:
        tall = np.asarray(im.convert("RGB"))
    assert tall.shape[0] > 96 + 30
    assert (tall[96 + 24 :] < 100).any()  # ink on the third line
    with pytest.raises(ValueError, match=r"^captions: 1 for 3 images"):
        save_grid(images, ["x"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"^images: expected uint8"):
        save_grid(images.astype(np.float32), ["a", "b", "c"], tmp_path / "bad.png")
