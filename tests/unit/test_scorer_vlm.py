"""vlm: the transformers backend on a tiny random LLaVA written to disk (llava-hf layout), word tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import RewardModel, make_scorer
from rewards.models import vlm

QUESTIONS = {"cat": "Is this a cat ? answer Yes or No", "match": 'Does this figure show "{prompt}" ?'}
PROMPTS = ["a red cat", "dog", "", "a cat a cat a cat a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(vlm.random_checkpoint("vlm", tmp_path_factory.mktemp("vlm"))["weights"])


@pytest.fixture(scope="module")
def judge(folder: Path) -> RewardModel:
    return make_scorer("vlm", weights=str(folder), questions=QUESTIONS, batch_size=4)


def _width(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["text_config"]["hidden_size"])


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 52, 3), dtype=np.uint8)


def _edit_lm_head(folder: Path, out: Path, rows: dict[str, torch.Tensor | str]) -> Path:
    """Copy the checkpoint with lm_head rows replaced: a vector, or the name of another token to copy."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(folder, out)
    tok = AutoTokenizer.from_pretrained(out)
    state = load_file(out / "model.safetensors")
    head = state["language_model.lm_head.weight"]  # llava-hf layout
    for word, value in rows.items():
        head[tok.convert_tokens_to_ids(word)] = (
            head[tok.convert_tokens_to_ids(value)] if isinstance(value, str) else value
        )
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_yes_probability_shape_range_determinism(judge: RewardModel) -> None:
    info = judge.info()
    assert info.name == "vlm" and info.heads == ["vlm"] and info.input_size is None
    images = _images(4)
    a = judge.score(images, PROMPTS)
    s = a.scores["vlm"]
    assert s.shape == (4,) and s.dtype == np.float32 and a.ok.all() and a.errors == [""] * 4
    assert np.all((s >= 0) & (s <= 1))
    assert set(a.extras) == set(QUESTIONS)
    np.testing.assert_allclose(s, (a.extras["cat"] + a.extras["match"]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(s, judge.score(images, PROMPTS).scores["vlm"])


def test_templates_and_batching(folder: Path, judge: RewardModel) -> None:
    images = np.repeat(_images(1, seed=2), 4, axis=0)  # one image, four prompts
    batch = judge.score(images, PROMPTS)
    # The prompt reaches the question only through {prompt}.
    assert np.ptp(batch.extras["cat"]) < 1e-6
    assert np.ptp(batch.extras["match"]) > 1e-4
    # Left padding does not change a row's answer: one at a time gives the same numbers.
    alone = make_scorer("vlm", weights=str(folder), questions=QUESTIONS, batch_size=1).score(images, PROMPTS)
    np.testing.assert_allclose(alone.scores["vlm"], batch.scores["vlm"], atol=1e-5)


def test_softmax_is_over_yes_and_no_only(folder: Path, tmp_path: Path) -> None:
    # Same lm_head row for Yes and No: equal logits, so P(Yes) is exactly 1/2 whatever the rest says.
    tied = _edit_lm_head(folder, tmp_path / "tied", {"Yes": "No"})
    s = make_scorer("vlm", weights=str(tied)).score(_images(3), PROMPTS[:3]).scores["vlm"]
    np.testing.assert_allclose(s, 0.5, atol=1e-6)
    # Opposite rows: P(Yes) = sigmoid(2 h.v), and swapping the answer words gives 1 - P(Yes).
    v = torch.randn(_width(folder), generator=torch.Generator().manual_seed(1))
    opposite = _edit_lm_head(folder, tmp_path / "opposite", {"Yes": v, "No": -v})
    yes = make_scorer("vlm", weights=str(opposite)).score(_images(3), PROMPTS[:3]).scores["vlm"]
    no = (
        make_scorer("vlm", weights=str(opposite), yes="No", no="Yes")
        .score(_images(3), PROMPTS[:3])
        .scores["vlm"]
    )
    np.testing.assert_allclose(yes + no, 1.0, atol=1e-6)
    assert np.abs(yes - 0.5).max() > 1e-3


def test_number_mode_parses_and_fails_items_honestly(folder: Path, tmp_path: Path) -> None:
    # Only the tokens "7" and "3" can win the argmax (rows v and -v, every other row 0), so every answer
    # is made of 7s and 3s; flipping v flips which one.
    from PIL import Image
    from transformers import AutoTokenizer

    v = torch.randn(_width(folder), generator=torch.Generator().manual_seed(2)) * 5
    rows: dict[str, torch.Tensor | str] = dict.fromkeys(
        AutoTokenizer.from_pretrained(folder).get_vocab(), torch.zeros(len(v))
    )
    images = _images(4, seed=5)
    seen: set[int] = set()
    for sign in (1.0, -1.0):
        digits = _edit_lm_head(folder, tmp_path / f"digits{sign}", {**rows, "7": sign * v, "3": -sign * v})
        kw = dict(weights=str(digits), mode="number", max_new_tokens=3, questions={"q": "Score ?"})
        wide = make_scorer("vlm", number_range="0,9", **kw)
        chat = [wide._chat("Score ?")] * 4  # type: ignore[attr-defined]
        answers = wide.backend.generate([Image.fromarray(i) for i in images], chat, 3)  # type: ignore[attr-defined]
        last = np.array([int(a.split()[-1]) for a in answers])
        seen |= set(last.tolist())
        batch = wide.score(images, [""] * 4)
        assert batch.ok.all()
        np.testing.assert_allclose(batch.scores["vlm"], last / 9.0, rtol=1e-6)
        narrow = make_scorer("vlm", number_range=[0, 5], **kw).score(images, [""] * 4)
        np.testing.assert_array_equal(narrow.ok, last == 3)
        assert all(("no number in [0, 5]" in e) == (n == 7) for e, n in zip(narrow.errors, last))
        assert np.isnan(narrow.scores["vlm"][~narrow.ok]).all(), "a failed item is NaN, never 0"
    assert seen == {3, 7}


def test_bad_configuration_is_named(folder: Path) -> None:
    with pytest.raises(ValueError, match="mode must be"):
        make_scorer("vlm", weights=str(folder), mode="logits")
    with pytest.raises(ValueError, match="backend must be"):
        make_scorer("vlm", weights=str(folder), backend="sglang")
    with pytest.raises(ValueError, match="'maybe so' is 2 tokens"):
        make_scorer("vlm", weights=str(folder), yes="maybe so")
    with pytest.raises(ValueError, match="number_range"):
        make_scorer("vlm", weights=str(folder), number_range="5,1")
    with pytest.raises(ValueError, match="vlm: weights"):
        make_scorer("vlm", weights="/nonexistent/vlm")
    # From the CLI the questions arrive as JSON text.
    judge = make_scorer(
        "vlm", weights=str(folder), questions='{"a": "Is this a cat ?", "b": "Is this a dog ?"}'
    )
    assert set(judge.score(_images(1), ["x"]).extras) == {"a", "b"}
