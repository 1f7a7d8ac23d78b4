"""hpsv2: an open_clip-layout checkpoint written by the test, loaded strictly, scored as HPSv2 does."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import make_scorer
from rewards.models.hpsv2 import VOCAB_FILE, OpenClipViT, open_clip_tokenizer

# Tiny widths with ViT-H-14's head widths (80 image, 64 text) and open_clip's MLP ratio 4.
V_WIDTH, V_LAYERS, PATCH, SIZE = 160, 2, 8, 32
T_WIDTH, T_LAYERS, CTX, EMBED = 128, 2, 77, 64


def _block(prefix: str, w: int) -> dict[str, tuple[int, ...]]:
    """open_clip ResidualAttentionBlock parameters (nn.MultiheadAttention packs q, k, v in in_proj)."""
    return {
        f"{prefix}.ln_1.weight": (w,), f"{prefix}.ln_1.bias": (w,),
        f"{prefix}.attn.in_proj_weight": (3 * w, w), f"{prefix}.attn.in_proj_bias": (3 * w,),
        f"{prefix}.attn.out_proj.weight": (w, w), f"{prefix}.attn.out_proj.bias": (w,),
        f"{prefix}.ln_2.weight": (w,), f"{prefix}.ln_2.bias": (w,),
        f"{prefix}.mlp.c_fc.weight": (4 * w, w), f"{prefix}.mlp.c_fc.bias": (4 * w,),
        f"{prefix}.mlp.c_proj.weight": (w, 4 * w), f"{prefix}.mlp.c_proj.bias": (w,),
    }  # fmt: skip


def published_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of an open_clip ViT CLIP state dict (what HPS_v2*_compressed.pt['state_dict'] holds)."""
    grid = SIZE // PATCH
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (V_WIDTH, 3, PATCH, PATCH),
        "visual.class_embedding": (V_WIDTH,),
        "visual.positional_embedding": (grid * grid + 1, V_WIDTH),
        "visual.ln_pre.weight": (V_WIDTH,), "visual.ln_pre.bias": (V_WIDTH,),
        "visual.ln_post.weight": (V_WIDTH,), "visual.ln_post.bias": (V_WIDTH,),
        "visual.proj": (V_WIDTH, EMBED),
        "token_embedding.weight": (vocab, T_WIDTH),
        "positional_embedding": (CTX, T_WIDTH),
        "ln_final.weight": (T_WIDTH,), "ln_final.bias": (T_WIDTH,),
        "text_projection": (T_WIDTH, EMBED),
        "logit_scale": (),
    }  # fmt: skip
    for i in range(V_LAYERS):
        shapes.update(_block(f"visual.transformer.resblocks.{i}", V_WIDTH))
    for i in range(T_LAYERS):
        shapes.update(_block(f"transformer.resblocks.{i}", T_WIDTH))
    return shapes


def _write_vocab(path: Path, n_merges: int) -> int:
    """A bpe_simple_vocab-format file: a version line, then merges; returns the vocabulary size."""
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "o n</w>", "t h", "th e</w>"][
        :n_merges
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return 512 + len(merges) + 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hps")
    vocab = _write_vocab(folder / VOCAB_FILE, 9)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in published_shapes(vocab).items()}
    for k in state:
        if ".ln_" in k or k.startswith(("ln_final", "visual.ln_")):
            state[k] = (1.0 if k.endswith("weight") else 0.0) + state[k]
    path = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, path)
    return path


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)


def test_vit_h_14_layout_as_published() -> None:
    # Checked once against hpsv2's own open_clip CLIP('ViT-H-14'): the same 686 names and shapes.
    state = {
        "visual.conv1.weight": torch.empty(1280, 3, 14, 14),
        "visual.positional_embedding": torch.empty(257, 1280),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.empty(5120, 1280),
        "token_embedding.weight": torch.empty(49408, 1024),
        "positional_embedding": torch.empty(77, 1024),
        "transformer.resblocks.0.mlp.c_fc.weight": torch.empty(4096, 1024),
        "text_projection": torch.empty(1024, 1024),
        **{f"visual.transformer.resblocks.{i}.ln_1.weight": torch.empty(1) for i in range(32)},
        **{f"transformer.resblocks.{i}.ln_1.weight": torch.empty(1) for i in range(24)},
    }
    arch = OpenClipViT.from_state_dict(state)
    assert arch["vision"] == dict(image_size=224, patch=14, width=1280, layers=32, heads=16, mlp=5120)
    with torch.device("meta"):
        own = OpenClipViT(**arch).state_dict()
    assert len(own) == 686
    assert own["visual.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert own["visual.proj"].shape == (1280, 1024) and own["logit_scale"].shape == ()


def test_loads_published_layout_and_scores(ckpt: Path) -> None:
    scorer = make_scorer("hpsv2", weights=str(ckpt.parent))  # a folder: the checkpoint is found in it
    info = scorer.info()
    assert info.name == "hpsv2" and info.input_size == SIZE and info.version == "hpsv2/HPS_v2.1_compressed"
    images, prompts = _images(4), ["a cat", "a red dog", "the cat on the mat", ""]
    batch = scorer.score(images, prompts)
    s = batch.scores["hpsv2"]
    assert s.shape == (4,) and s.dtype == np.float32 and batch.ok.all()
    assert np.all(np.abs(s) <= 1.0 + 1e-5), "HPS is a cosine"
    np.testing.assert_array_equal(s, scorer.score(images, prompts).scores["hpsv2"])
    swapped = scorer.score(images, prompts[::-1]).scores["hpsv2"]
    assert not np.allclose(s, swapped), "the prompt must matter"


def test_score_is_cosine_of_the_loaded_towers(ckpt: Path) -> None:
    scorer = make_scorer("hpsv2", weights=str(ckpt))
    state = torch.load(ckpt)["state_dict"]
    model = scorer.model  # type: ignore[attr-defined]
    torch.testing.assert_close(model.visual.proj.detach(), state["visual.proj"])
    torch.testing.assert_close(model.transformer.resblocks[1].attn.in_proj_weight.detach(),
                               state["transformer.resblocks.1.attn.in_proj_weight"])  # fmt: skip
    # Flipping the text projection flips every text feature, hence every score.
    flipped = dict(state, text_projection=-state["text_projection"])
    torch.save({"state_dict": flipped}, ckpt.parent / "flipped.pt")
    images, prompts = _images(3, seed=2), ["a cat", "dog", "red"]
    base = scorer.score(images, prompts).scores["hpsv2"]
    other = (
        make_scorer("hpsv2", weights=str(ckpt.parent / "flipped.pt")).score(images, prompts).scores["hpsv2"]
    )
    np.testing.assert_allclose(other, -base, rtol=1e-5, atol=1e-6)


def test_tokenizer_follows_open_clip(ckpt: Path) -> None:
    tok = open_clip_tokenizer(ckpt.parent / VOCAB_FILE)
    scorer = make_scorer("hpsv2", weights=str(ckpt))
    ids = scorer.tokenize(["The  CAT", "x " * 200])  # type: ignore[attr-defined]
    sot, eot = tok.convert_tokens_to_ids(["<start_of_text>", "<end_of_text>"])
    assert (sot, eot) == (521, 522)  # 256 bytes, 256 bytes + '</w>', 9 merges, then the two specials
    cat = tok.convert_tokens_to_ids("cat</w>")
    assert ids[0, :4].tolist() == [sot, tok.convert_tokens_to_ids("the</w>"), cat, eot]
    assert ids[0, 4:].eq(0).all(), "zero padding, as open_clip"
    assert ids.shape == (2, CTX) and ids[1, -1] == eot and (ids[1] != 0).all(), "truncated, eot kept last"


def test_missing_or_foreign_keys_are_named(ckpt: Path, tmp_path: Path) -> None:
    state = torch.load(ckpt)["state_dict"]
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "ln_final.bias"}}, tmp_path / "a.pt")
    (tmp_path / VOCAB_FILE).write_bytes((ckpt.parent / VOCAB_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"missing \[.ln_final\.bias.\]"):
        make_scorer("hpsv2", weights=str(tmp_path / "a.pt"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()} | {"extra": torch.zeros(1)}},
               tmp_path / "b.pt")  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        make_scorer("hpsv2", weights=str(tmp_path / "b.pt"))
    with pytest.raises(ValueError, match="hpsv2: tokenizer"):
        make_scorer("hpsv2", weights=str(ckpt), tokenizer=str(tmp_path / "none.gz"))


def test_matches_open_clip_when_installed(ckpt: Path) -> None:
    """In the hpsv2 environment (make env-hpsv2) the real open_clip model must give the same scores."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip needs torchvision: only in env-hpsv2")
    from open_clip.model import CLIP

    ref = CLIP(embed_dim=EMBED, vision_cfg=dict(image_size=SIZE, layers=V_LAYERS, width=V_WIDTH, head_width=80,
                                                patch_size=PATCH),
               text_cfg=dict(context_length=CTX, vocab_size=523, width=T_WIDTH, heads=2, layers=T_LAYERS))  # fmt: skip
    ref.load_state_dict(torch.load(ckpt)["state_dict"])
    ref.eval()
    scorer = make_scorer("hpsv2", weights=str(ckpt))
    images, prompts = _images(3, seed=4), ["a cat", "the dog", "red"]
    from rewards.models._preprocess import clip_pixels

    with torch.no_grad():
        img = ref.encode_image(clip_pixels(images, SIZE, resample="tensor"), normalize=True)
        txt = ref.encode_text(scorer.tokenize(prompts), normalize=True)  # type: ignore[attr-defined]
    expected = (img * txt).sum(-1).numpy()
    assert open_clip is not None
    np.testing.assert_allclose(scorer.score(images, prompts).scores["hpsv2"], expected, atol=1e-5)
