"""pickscore / clipscore: a tiny random transformers CLIP written to disk in the Hugging Face layout."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import RewardModel, make_scorer
from rewards.models import clip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(clip.random_checkpoint("pickscore", tmp_path_factory.mktemp("clip"))["weights"])


@pytest.fixture(scope="module")
def pick(folder: Path) -> RewardModel:
    return make_scorer("pickscore", weights=str(folder))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 56, 3), dtype=np.uint8)


PROMPTS = ["a red cat", "a blue dog on a mat", "", "sky " * 60]  # empty and over-long prompts too


def test_published_layout_on_disk(folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    # Names as in openai/clip-vit-* and PickScore_v1's model.safetensors.
    for key in ("logit_scale", "visual_projection.weight", "text_projection.weight",
                "vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight",
                "vision_model.encoder.layers.1.self_attn.q_proj.weight"):  # fmt: skip
        assert key in state, key


def test_scores_shape_status_determinism(pick: RewardModel) -> None:
    info = pick.info()
    assert info.name == "pickscore" and info.heads == ["pickscore"] and info.input_size == 32
    images = _images(len(PROMPTS))
    a = pick.score(images, PROMPTS)
    b = pick.score(images, PROMPTS)
    s = a.scores["pickscore"]
    assert s.shape == (len(PROMPTS),) and s.dtype == np.float32
    assert a.ok.all() and a.errors == [""] * len(PROMPTS)
    np.testing.assert_array_equal(s, b.scores["pickscore"])
    assert len(set(np.round(s, 6))) == len(PROMPTS), "scores must depend on the image and prompt"


def test_pickscore_is_scaled_cosine_and_clipscore_clamps(folder: Path, pick: RewardModel) -> None:
    images = _images(8, seed=3)
    prompts = ["a cat", "a dog", "the sky", "a mat"] * 2
    p = pick.score(images, prompts).scores["pickscore"]
    c = make_scorer("clipscore", weights=str(folder), w="2.5").score(images, prompts).scores["clipscore"]
    scale = pick.model.logit_scale.exp().item()  # type: ignore[attr-defined]
    cos = p / scale
    assert np.all(np.abs(cos) <= 1.0 + 1e-5)
    np.testing.assert_allclose(c, 2.5 * np.maximum(cos, 0.0), rtol=1e-5, atol=1e-6)


def test_weights_are_read_from_the_file(folder: Path, pick: RewardModel, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    state = load_file(edited / "model.safetensors")
    state["logit_scale"] = state["logit_scale"] + math.log(2.0)  # doubles exp(logit_scale)
    save_file(state, edited / "model.safetensors", metadata={"format": "pt"})
    images = _images(3, seed=5)
    prompts = PROMPTS[:3]
    base = pick.score(images, prompts).scores["pickscore"]
    doubled = make_scorer("pickscore", weights=str(edited)).score(images, prompts).scores["pickscore"]
    np.testing.assert_allclose(doubled, 2.0 * base, rtol=1e-5)


def test_bad_input_is_a_clear_error(pick: RewardModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        pick.score(_images(2).astype(np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        pick.score(_images(2), ["a"])
    with pytest.raises(ValueError, match="pickscore: weights"):
        make_scorer("pickscore", weights=str(tmp_path / "missing"))


def test_non_finite_scores_fail_the_item_not_zero(pick: RewardModel) -> None:
    # A NaN from the network (e.g. an fp16 overflow) must surface as ok=False, never as a number.
    with torch.no_grad():
        old = pick.model.logit_scale.clone()  # type: ignore[attr-defined]
        pick.model.logit_scale.fill_(float("nan"))  # type: ignore[attr-defined]
    try:
        batch = pick.score(_images(2), ["a", "b"])
    finally:
        with torch.no_grad():
            pick.model.logit_scale.copy_(old)  # type: ignore[attr-defined]
    assert not batch.ok.any() and all(e == "non-finite score" for e in batch.errors)
    assert np.isnan(batch.scores["pickscore"]).all()
