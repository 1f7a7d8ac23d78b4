"""imagereward: an ImageReward.pt written by the test with BLIP's published names, loaded and scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rewards.base import make_scorer
from rewards.models.imagereward import _MEAN, _STD, ImageRewardNet, to_published

# Tiny BLIP: ViT width 128 (2 heads of 64, as ViT-L/16), patch 16 on 32 px; BERT width 32.
V_WIDTH, V_LAYERS, PATCH, SIZE = 128, 2, 16, 32
T_WIDTH, T_LAYERS, T_HEADS, T_FF, MAX_POS = 32, 2, 4, 64, 40
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "the", "mat", "blue"]


def _bert_attention(prefix: str, kv_width: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.self.query.weight": (T_WIDTH, T_WIDTH), f"{prefix}.self.query.bias": (T_WIDTH,),
        f"{prefix}.self.key.weight": (T_WIDTH, kv_width), f"{prefix}.self.key.bias": (T_WIDTH,),
        f"{prefix}.self.value.weight": (T_WIDTH, kv_width), f"{prefix}.self.value.bias": (T_WIDTH,),
        f"{prefix}.output.dense.weight": (T_WIDTH, T_WIDTH), f"{prefix}.output.dense.bias": (T_WIDTH,),
        f"{prefix}.output.LayerNorm.weight": (T_WIDTH,), f"{prefix}.output.LayerNorm.bias": (T_WIDTH,),
    }  # fmt: skip


def published_shapes() -> dict[str, tuple[int, ...]]:
    """ImageReward.state_dict() names: BLIP vit.py VisionTransformer, med.py BertModel, vision/text_proj, MLP."""
    v, t = "blip.visual_encoder", "blip.text_encoder"
    shapes: dict[str, tuple[int, ...]] = {
        f"{v}.cls_token": (1, 1, V_WIDTH),
        f"{v}.pos_embed": (1, (SIZE // PATCH) ** 2 + 1, V_WIDTH),
        f"{v}.patch_embed.proj.weight": (V_WIDTH, 3, PATCH, PATCH), f"{v}.patch_embed.proj.bias": (V_WIDTH,),
        f"{v}.norm.weight": (V_WIDTH,), f"{v}.norm.bias": (V_WIDTH,),
        f"{t}.embeddings.word_embeddings.weight": (len(VOCAB), T_WIDTH),
        f"{t}.embeddings.position_embeddings.weight": (MAX_POS, T_WIDTH),
        f"{t}.embeddings.LayerNorm.weight": (T_WIDTH,), f"{t}.embeddings.LayerNorm.bias": (T_WIDTH,),
        "blip.vision_proj.weight": (256, V_WIDTH), "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, T_WIDTH), "blip.text_proj.bias": (256,),
    }  # fmt: skip
    for i in range(V_LAYERS):
        b = f"{v}.blocks.{i}"
        shapes.update({
            f"{b}.norm1.weight": (V_WIDTH,), f"{b}.norm1.bias": (V_WIDTH,),
            f"{b}.attn.qkv.weight": (3 * V_WIDTH, V_WIDTH), f"{b}.attn.qkv.bias": (3 * V_WIDTH,),
            f"{b}.attn.proj.weight": (V_WIDTH, V_WIDTH), f"{b}.attn.proj.bias": (V_WIDTH,),
            f"{b}.norm2.weight": (V_WIDTH,), f"{b}.norm2.bias": (V_WIDTH,),
            f"{b}.mlp.fc1.weight": (4 * V_WIDTH, V_WIDTH), f"{b}.mlp.fc1.bias": (4 * V_WIDTH,),
            f"{b}.mlp.fc2.weight": (V_WIDTH, 4 * V_WIDTH), f"{b}.mlp.fc2.bias": (V_WIDTH,),
        })  # fmt: skip
    for i in range(T_LAYERS):
        b = f"{t}.encoder.layer.{i}"
        shapes.update(_bert_attention(f"{b}.attention", T_WIDTH))
        shapes.update(_bert_attention(f"{b}.crossattention", V_WIDTH))  # keys/values read the image tokens
        shapes.update({
            f"{b}.intermediate.dense.weight": (T_FF, T_WIDTH), f"{b}.intermediate.dense.bias": (T_FF,),
            f"{b}.output.dense.weight": (T_WIDTH, T_FF), f"{b}.output.dense.bias": (T_WIDTH,),
            f"{b}.output.LayerNorm.weight": (T_WIDTH,), f"{b}.output.LayerNorm.bias": (T_WIDTH,),
        })  # fmt: skip
    for i, (out, inp) in {0: (1024, T_WIDTH), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items():
        shapes[f"mlp.layers.{i}.weight"], shapes[f"mlp.layers.{i}.bias"] = (out, inp), (out,)
    return shapes


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ir")
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in published_shapes().items()}
    for k in state:
        if "norm" in k.lower():
            state[k] = (1.0 if k.endswith("weight") else 0.0) + state[k]
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(MAX_POS)[
        None
    ]  # a persistent buffer there
    torch.save(state, root / "ImageReward.pt")
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
               hidden_dropout_prob=0.1, hidden_size=T_WIDTH, initializer_range=0.02, intermediate_size=T_FF,
               layer_norm_eps=1e-12, max_position_embeddings=MAX_POS, model_type="bert",
               num_attention_heads=T_HEADS, num_hidden_layers=T_LAYERS, pad_token_id=0, type_vocab_size=2,
               vocab_size=len(VOCAB), encoder_width=768, add_cross_attention=True)  # fmt: skip
    (root / "med_config.json").write_text(json.dumps(med))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)


def test_published_layout_loads_and_scores(folder: Path) -> None:
    scorer = make_scorer("imagereward", weights=str(folder))
    info = scorer.info()
    assert info.name == "imagereward" and info.input_size == SIZE and info.heads == ["imagereward"]
    images, prompts = _images(4), ["a red cat", "the dog on the mat", "", "blue " * 50]
    batch = scorer.score(images, prompts)
    s = batch.scores["imagereward"]
    assert s.shape == (4,) and s.dtype == np.float32 and batch.ok.all() and batch.errors == [""] * 4
    np.testing.assert_array_equal(s, scorer.score(images, prompts).scores["imagereward"])
    assert len(set(np.round(s, 6))) == 4


def test_head_bias_and_standardisation(folder: Path, tmp_path: Path) -> None:
    # reward = (mlp(cls) - mean) / std: moving the last bias by d moves every score by d / std.
    state = torch.load(folder / "ImageReward.pt")
    state["mlp.layers.7.bias"] = state["mlp.layers.7.bias"] + 1.0
    for name in ("med_config.json", "tokenizer"):
        (tmp_path / name).symlink_to(folder / name)
    torch.save(state, tmp_path / "ImageReward.pt")
    images, prompts = _images(3, seed=1), ["a cat", "a dog", "mat"]
    base = make_scorer("imagereward", weights=str(folder)).score(images, prompts).scores["imagereward"]
    moved = make_scorer("imagereward", weights=str(tmp_path / "ImageReward.pt")).score(images, prompts)
    np.testing.assert_allclose(moved.scores["imagereward"] - base, 1.0 / _STD, rtol=1e-4)
    assert _MEAN == pytest.approx(0.16717362830052426) and _STD == pytest.approx(1.0333394966054072)


def test_image_and_prompt_both_reach_the_score(folder: Path) -> None:
    scorer = make_scorer("imagereward", weights=str(folder))
    images = _images(2, seed=3)
    a = scorer.score(images, ["a red cat", "a red cat"]).scores["imagereward"]
    b = scorer.score(images, ["the blue dog", "the blue dog"]).scores["imagereward"]
    assert a[0] != a[1], "different images, same prompt"
    assert a[0] != b[0], "same image, different prompt (cross-attention)"


def test_native_layout_as_published() -> None:
    # ViT-L/16 + BERT-base, checked once against the image-reward package's own modules (same names).
    vision = dict(hidden_size=1024, patch_size=16, image_size=224, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096)  # fmt: skip
    text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=512, encoder_hidden_size=1024)  # fmt: skip
    with torch.device("meta"):
        state = to_published(ImageRewardNet(vision, text).state_dict())
    # 294 image-tower, 316 text-encoder and 10 head tensors (vision/text_proj and position_ids skipped).
    assert len(state) == 620
    assert state["blip.visual_encoder.pos_embed"].shape == (1, 197, 1024)
    assert state["blip.visual_encoder.blocks.23.attn.qkv.weight"].shape == (3072, 1024)
    assert state["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)
    assert state["mlp.layers.0.weight"].shape == (1024, 768)


def test_layout_errors_are_named(folder: Path, tmp_path: Path) -> None:
    state = torch.load(folder / "ImageReward.pt")
    for name in ("med_config.json", "tokenizer"):
        (tmp_path / name).symlink_to(folder / name)
    torch.save({**state, "blip.itm_head.weight": torch.zeros(2, T_WIDTH)}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"unexpected \['blip.itm_head.weight'\]"):
        make_scorer("imagereward", weights=str(tmp_path))
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.value.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(
        ValueError, match=r"missing \['blip.text_encoder.encoder.layer.1.crossattention.self.value.bias'\]"
    ):
        make_scorer("imagereward", weights=str(tmp_path))
    with pytest.raises(ValueError, match="imagereward: med_config"):
        make_scorer("imagereward", weights=str(folder), med_config=str(tmp_path / "nope.json"))


def test_matches_image_reward_package_when_installed(folder: Path) -> None:
    """In the reference environment (make env-imagereward) the package's own BLIP gives the same scores."""
    pytest.importorskip(
        "ImageReward", reason="image-reward pins transformers 4.55 + timm: only in env-imagereward"
    )
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer
    from torch import nn

    from rewards.models._preprocess import clip_pixels

    ref: Any = nn.Module()
    ref.blip = nn.Module()
    ref.blip.visual_encoder = VisionTransformer(
        img_size=SIZE, patch_size=PATCH, embed_dim=V_WIDTH, depth=V_LAYERS, num_heads=V_WIDTH // 64
    )
    config = BertConfig.from_json_file(str(folder / "med_config.json"))
    config.encoder_width = V_WIDTH
    ref.blip.text_encoder = BertModel(config=config, add_pooling_layer=False)
    ref.blip.vision_proj, ref.blip.text_proj = nn.Linear(V_WIDTH, 256), nn.Linear(T_WIDTH, 256)
    ref.mlp = nn.Module()
    ref.mlp.layers = nn.Sequential(nn.Linear(T_WIDTH, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                   nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))  # fmt: skip
    ref.load_state_dict(torch.load(folder / "ImageReward.pt"), strict=True)
    ref.eval()
    scorer = make_scorer("imagereward", weights=str(folder))
    images, prompts = _images(3, seed=7), ["a red cat", "the dog on the mat", "blue"]
    tokenizer: Any = scorer.tokenizer  # type: ignore[attr-defined]
    text = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = ref.blip.visual_encoder(clip_pixels(images, SIZE, resample="pil"))
        out = ref.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=emb,
                                    encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long),
                                    return_dict=True)  # fmt: skip
        expected = ((ref.mlp.layers(out.last_hidden_state[:, 0]) - _MEAN) / _STD).squeeze(-1).numpy()
    np.testing.assert_allclose(scorer.score(images, prompts).scores["imagereward"], expected, atol=1e-5)
