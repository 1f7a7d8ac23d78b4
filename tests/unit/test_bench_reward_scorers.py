"""The reward suite's model-scorer cases, quick mode, on the two cheapest scorers (a few seconds)."""

from __future__ import annotations

import math

from bench import reward_scorers


def test_quick_rows_compare_the_service_with_in_process() -> None:
    rows = reward_scorers.run(quick=True, names=("composition", "clipscore"))
    assert [r.case for r in rows] == [
        "composition 32px batch 8 via service",  # shapes-world scenes at the world's size
        "clipscore 32px batch 8 via service",  # the tiny CLIP's input size
    ]
    for row in rows:
        assert row.suite == "reward" and row.metric == "images/s"
        assert row.baseline_name == "in-process scorer.score" and row.baseline is not None
        assert math.isfinite(row.value) and row.value > 0 and math.isfinite(row.baseline) and row.baseline > 0
        assert row.ratio is not None and math.isclose(row.ratio, row.value / row.baseline)
        assert row.met == (row.ratio >= reward_scorers.TARGET)
        assert row.extra["repeats"] >= 3 and row.extra["service_ms_per_batch"] > 0
    assert "no weights" in rows[0].note and "tiny config, random weights" in rows[1].note
