"""`imagereward`: ImageReward v1.0 (Xu et al., 2023, arXiv 2304.05977): BLIP + an MLP head.

The prompt is encoded by BLIP's BERT text encoder with cross-attention into the ViT-L/16 image tokens;
the [CLS] feature goes through the improved-aesthetic-predictor MLP, and the result is standardised with
the training set's mean and std (`ImageReward.score`). Scores are about N(0, 1) over generated images.

The `image-reward` package pins transformers 4.55 and imports torchvision and timm; we run the same
network on transformers' BLIP modules instead (`BlipVisionModel` is BLIP's ViT, `BlipTextModel` its
`med.BertModel`), so it runs in the main environment. `ImageReward.pt` (a flat state dict, as published)
is renamed into them key by key (`_RENAMES`); `blip.vision_proj` / `blip.text_proj` (contrastive heads the
score does not use) and the `position_ids` buffer are skipped, anything else must match exactly. The
image tower's shape is read from the checkpoint, the text tower's from `med_config.json`. BLIP's
tokenizer is bert-base-uncased from a local folder (the package downloads it; we never do).

Expected on disk (`weights`: the folder, or the .pt inside it):
    ImageReward.pt  med_config.json  tokenizer/vocab.txt (bert-base-uncased)

Example:
    scorer = make_scorer("imagereward", weights="/ckpt/ImageReward")
    scorer.score(images_uint8_nhwc, prompts).scores["imagereward"]  # float32 [N]
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewards.base import ScoreBatch, ScorerInfo, register
from rewards.models._preprocess import (
    check_batch,
    clip_pixels,
    existing,
    load_state_dict,
    load_strict,
    torch_dtype,
)
from rewards.models.aesthetic import preference_mlp

# Published ImageReward name -> transformers BLIP name, applied in order (each at most once per key).
_RENAMES = [
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.visual_encoder.blocks.", "vision.encoder.layers."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.proj.", ".self_attn.projection."),
    ("blip.text_encoder.", "text."),
]
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
# ImageReward.py: rewards = (mlp(cls) - mean) / std, statistics of the training set.
_MEAN, _STD = 0.16717362830052426, 1.0333394966054072
_MAX_TOKENS = 35  # ImageReward tokenises with padding='max_length', max_length=35


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        key = key.replace(old, new, 1)
    return key


_BACK = [(new, old) for old, new in reversed(_RENAMES)]


def to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> ImageReward.pt names (the inverse of the loader's renaming)."""
    return {_rename(k, _BACK): v for k, v in state.items()}


class ImageRewardNet(nn.Module):
    """BLIP image tower, BLIP text encoder with cross-attention, MLP head (`mlp.layers.*` as published)."""

    def __init__(self, vision: dict[str, Any], text: dict[str, Any]) -> None:
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        # BLIP's ViT uses LayerNorm eps 1e-6 and exact GELU; is_decoder builds the cross-attention layers.
        self.vision = BlipVisionModel(BlipVisionConfig(layer_norm_eps=1e-6, hidden_act="gelu", **vision))
        # No generation here: BLIP's decoder token ids (defaults sized for BERT's vocabulary) are unused.
        ids: dict[str, Any] = dict(bos_token_id=None, sep_token_id=None, eos_token_id=None)
        self.text = BlipTextModel(BlipTextConfig(is_decoder=True, **ids, **text), add_pooling_layer=False)
        self.mlp = nn.Sequential(OrderedDict(layers=preference_mlp(text["hidden_size"])))

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """float [N, 3, S, S], int64 [N, L] x2 -> standardised reward float [N]."""
        image = self.vision(pixel_values=pixels).last_hidden_state  # [N, 1 + grid², W]
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                        encoder_attention_mask=image_mask, is_decoder=False)  # fmt: skip
        reward = self.mlp(out.last_hidden_state[:, 0]).squeeze(-1).float()
        return (reward - _MEAN) / _STD


def _arch(state: dict[str, torch.Tensor], med: dict[str, Any], head_width: int) -> dict[str, dict[str, Any]]:
    """Vision tower shape from the published checkpoint; text tower from med_config.json."""
    conv = state["blip.visual_encoder.patch_embed.proj.weight"]  # [W, 3, patch, patch]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    depth = sum(
        1 for k in state if k.startswith("blip.visual_encoder.blocks.") and k.endswith(".norm1.weight")
    )
    vision = dict(
        hidden_size=width, patch_size=patch, image_size=grid * patch, num_hidden_layers=depth,
        num_attention_heads=width // head_width,
        intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
    )  # fmt: skip
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")  # fmt: skip
    text = {k: med[k] for k in keys if k in med}
    text["encoder_hidden_size"] = width  # BLIP_Pretrain sets encoder_width to the ViT width
    return {"vision": vision, "text": text}


@register("imagereward")
class ImageReward:
    """ImageReward from a local folder holding ImageReward.pt, med_config.json and a BERT tokenizer."""

    def __init__(
        self,
        *,
        weights: str | Path,
        med_config: str | Path | None = None,
        tokenizer: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        vision_head_width: int | str = 64,
    ) -> None:
        from transformers import BertTokenizer

        path = existing(weights, "imagereward: weights")
        ckpt = path / "ImageReward.pt" if path.is_dir() else path
        folder = ckpt.parent
        med_path = existing(med_config or folder / "med_config.json", "imagereward: med_config")
        med = json.loads(med_path.read_text())
        published = load_state_dict(existing(ckpt, "imagereward: weights"))
        state = {_rename(k, _RENAMES): v for k, v in published.items() if not k.startswith(_UNUSED)}
        try:
            arch = _arch(published, med, int(vision_head_width))
        except KeyError as exc:
            raise ValueError(f"imagereward: {ckpt} / {med_path} lack {exc}") from None
        with torch.device("meta"):  # the checkpoint's tensors are assigned: no random init of 0.5B params
            net = ImageRewardNet(**arch)
        load_strict(net, state, f"imagereward: {ckpt}", lambda k: _rename(k, _BACK))
        # The only non-persistent buffer: positions 0..max-1 (left on meta by the assign-load above).
        emb = net.text.embeddings
        emb.position_ids = torch.arange(emb.position_embeddings.num_embeddings).unsqueeze(0)  # type: ignore[assignment]
        self.device = torch.device(device)
        self.net = net.to(self.device, torch_dtype(dtype)).eval()
        self.tokenizer = BertTokenizer.from_pretrained(
            existing(tokenizer or folder / "tokenizer", "imagereward: tokenizer")
        )
        self.size = arch["vision"]["image_size"]
        self.version = f"imagereward/{ckpt.stem}"

    def info(self) -> ScorerInfo:
        return ScorerInfo(name="imagereward", version=self.version, heads=["imagereward"], input_size=self.size,
                          max_batch=32)  # fmt: skip

    @torch.inference_mode()
    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        check_batch("imagereward", images, prompts)
        dtype = self.net.text.embeddings.word_embeddings.weight.dtype
        pixels = clip_pixels(images, self.size, resample="pil").to(self.device, dtype)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=_MAX_TOKENS,
                              return_tensors="pt")  # fmt: skip
        reward = self.net(pixels, text["input_ids"].to(self.device), text["attention_mask"].to(self.device))
        return ScoreBatch(scores={"imagereward": reward.cpu().numpy().astype(np.float32)})


_WORDS = ["a", "an", "the", "of", "on", "in", "cat", "dog", "red", "blue", "photo", "painting", "mat", "sky"]


def random_checkpoint(name: str, root: str | Path, *, native: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write a random ImageReward folder (ImageReward.pt in the published key layout, med_config.json, a
    small BERT vocab) under `root`; return `make_scorer("imagereward", **kwargs)` arguments.
    `native`: ViT-L/16 + BERT-base as published (for timing), else tiny."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS]
    vision: dict[str, Any]
    med: dict[str, Any]
    if native:
        vision = dict(hidden_size=1024, patch_size=16, image_size=224, num_hidden_layers=24,
                      num_attention_heads=16, intermediate_size=4096)  # fmt: skip
        med = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=512)  # fmt: skip
    else:
        vision = dict(hidden_size=128, patch_size=16, image_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512)  # fmt: skip
        med = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    med.update(
        architectures=["BertModel"],
        model_type="bert",
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
        type_vocab_size=2,
        encoder_width=vision["hidden_size"],
        add_cross_attention=True,
    )
    torch.manual_seed(seed)
    text = {k: med[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "max_position_embeddings")}  # fmt: skip
    net = ImageRewardNet(vision, {**text, "encoder_hidden_size": vision["hidden_size"]})
    with torch.no_grad():
        for p in net.mlp.parameters():  # the published init is N(0, 1/(d+1)): keep scores visibly non-zero
            p.normal_(0.0, 0.05)
    state = to_published(net.state_dict())
    width, text_width = int(vision["hidden_size"]), int(med["hidden_size"])  # type: ignore[call-overload]
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(int(med["max_position_embeddings"]))[
        None
    ]  # type: ignore[call-overload]
    for key, fan_in in (("vision_proj", width), ("text_proj", text_width)):
        state[f"blip.{key}.weight"] = torch.randn(256, fan_in) * 0.02
        state[f"blip.{key}.bias"] = torch.zeros(256)
    folder = Path(root) / f"imagereward-{'native' if native else 'tiny'}"
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return {"weights": str(folder)}
