"""The progress line: what it shows on a terminal, and silence when not on one or when disabled."""

from __future__ import annotations

import io

from rich.console import Console

from orchestrator.metrics import LoggingConfig
from orchestrator.progress import Progress, summary


def test_summary_picks_the_first_logged_key_of_each_group() -> None:
    metrics = {"preview/reward_mean": 0.1, "final/reward_mean": 0.41234, "preview/images_per_s": 35.0}
    assert summary(metrics) == "reward 0.412  img/s 35.0"
    assert summary({"learner/loss": 0.5}) == "loss 0.5000"
    assert summary({}) == ""


def test_progress_draws_stage_step_and_metrics_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    progress = Progress(LoggingConfig(), total=10, stage="sol_rl", console=console)
    assert progress.active
    progress.update(3, {"final/reward_mean": 0.5, "final/images_per_s": 12.0})
    progress.set_stage("eval")
    progress.close()
    text = out.getvalue()
    assert "3/10" in text and "reward 0.500" in text and "img/s 12.0" in text and "eval" in text


def test_progress_is_silent_off_a_terminal_or_when_disabled() -> None:
    for cfg, terminal in ((LoggingConfig(), False), (LoggingConfig(progress=False), True)):
        out = io.StringIO()
        progress = Progress(cfg, total=5, stage="sft", console=Console(file=out, force_terminal=terminal))
        progress.update(1, {"learner/loss": 1.0})
        progress.close()
        assert not progress.active and out.getvalue() == ""
