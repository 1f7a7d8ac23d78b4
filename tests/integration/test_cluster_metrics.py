"""The run's custom metrics reach Ray's Prometheus export on the embedded (loopback) cluster."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.metrics import LoggingConfig, MetricsLogger


@pytest.mark.ray
def test_step_metrics_appear_in_the_prometheus_export(ray_cluster: dict[str, Any], tmp_path: Path) -> None:
    logger = MetricsLogger(LoggingConfig(wandb="disabled", plot_keys=[]), tmp_path, run_name="t")
    logger.log(
        1,
        {
            "final/images_per_s": 12.5, "preview/images_per_s": 40.0, "final/reward_mean": 0.75,
            "reward/probe_scorer/latency_s": 0.2, "queue_depth": 2, "pipeline/staleness": 1,
            "time/learn_s": 1.5, "learner/loss": float("nan"),
        },
    )  # fmt: skip
    logger.close()
    url = f"http://127.0.0.1:{ray_cluster['metrics_export_port']}/metrics"
    # Gauges hold the last value any logger of this process set (other tests may log too): their
    # series must exist; the histogram of this test's own scorer must hold exactly its one observation.
    wanted = {
        "images": r'ray_sana_rl_rollout_images_per_s\{[^}]*stage="final"[^}]*\} \d',
        "reward": r'ray_sana_rl_reward_mean\{[^}]*stage="final"[^}]*\} \d',
        "latency": r'ray_sana_rl_reward_latency_seconds_count\{[^}]*scorer="probe_scorer"[^}]*\} 1(\.0)?\n',
        "queue": r"ray_sana_rl_queue_depth\{[^}]*\} \d",
        "step_time": r"ray_sana_rl_learner_step_seconds_bucket\{[^}]*\} [1-9]",
        "non_finite": r"ray_sana_rl_non_finite_total\{[^}]*\} [1-9]",
    }
    # Ray exports a gauge in the interval after it was set, then drops it until it is set again: collect
    # what each scrape shows.
    deadline, found = time.monotonic() + 40, set[str]()  # the metrics agent exports every ~10 s
    while time.monotonic() < deadline and len(found) < len(wanted):
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        found |= {k for k, p in wanted.items() if re.search(p, body)}
        time.sleep(1.0)
    assert found == set(wanted), f"not exported: {sorted(set(wanted) - found)}"
