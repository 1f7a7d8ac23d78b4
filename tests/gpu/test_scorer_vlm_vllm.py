"""vlm judge, vLLM backend: the same answers as the transformers backend on the same tiny checkpoint.

Runs in env-vlm (vLLM installed) on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import make_scorer
from rewards.models import vlm

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm", reason="vLLM is installed only in env-vlm (make env-vlm)")
    return Path(vlm.random_checkpoint("vlm", tmp_path_factory.mktemp("vllm"))["weights"])


def test_vllm_yes_probability_matches_transformers(folder: Path) -> None:
    questions = {"cat": "Is this a cat ? answer Yes or No", "match": 'Does this figure show "{prompt}" ?'}
    images = np.random.default_rng(0).integers(0, 256, (4, 40, 52, 3), dtype=np.uint8)
    prompts = ["a red cat", "dog", "", "a cat a cat"]
    common = dict(weights=str(folder), questions=questions, dtype="float32")
    reference = make_scorer("vlm", device="cuda", **common).score(images, prompts)
    # The tiny vocabulary has fewer than 64 tokens: asking for 64 logprobs makes Yes and No always present.
    served = make_scorer(
        "vlm", backend="vllm", top_logprobs=64, engine_args={"max_logprobs": 64, "gpu_memory_utilization": 0.3},
        **common,
    )  # fmt: skip
    batch = served.score(images, prompts)
    assert batch.ok.all() and reference.ok.all()
    np.testing.assert_allclose(batch.scores["vlm"], reference.scores["vlm"], atol=2e-3)
    for q in questions:
        np.testing.assert_allclose(batch.extras[q], reference.extras[q], atol=2e-3)
    # Greedy answers agree too (number mode goes through generate on both backends).
    from PIL import Image

    pil = [Image.fromarray(i) for i in images]
    chat = [served._chat("Score ?")] * 4  # type: ignore[attr-defined]
    by_vllm = served.backend.generate(pil, chat, 3)  # type: ignore[attr-defined]
    by_hf = make_scorer("vlm", device="cuda", **common).backend.generate(pil, chat, 3)  # type: ignore[attr-defined]
    assert [a.split() for a in by_vllm] == [a.split() for a in by_hf]
