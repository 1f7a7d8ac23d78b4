"""`pickscore` and `clipscore`: image-text similarity from a transformers CLIP on disk.

- PickScore (Kirstain et al., 2023, arXiv 2305.01569): CLIP-H fine-tuned on Pick-a-Pic preferences;
  score = exp(logit_scale) · cos(image, prompt), as its reference code computes it (about 18-24 for
  ordinary images). Weights: `yuvalkirstain/PickScore_v1` (a `CLIPModel` folder); its processor and
  tokenizer come from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (pass that folder as `processor`).
- CLIPScore (Hessel et al., 2021, arXiv 2104.08718): `w · max(cos(image, prompt), 0)` with w = 2.5 on
  CLIP ViT-B/32 (`openai/clip-vit-base-patch32`).

Both use the PIL image processor (no torchvision), so the pixels are the same in every environment.

Example:
    scorer = make_scorer("pickscore", weights="/ckpt/PickScore_v1", processor="/ckpt/CLIP-ViT-H-14")
    scorer.score(images_uint8_nhwc, prompts).scores["pickscore"]  # float32 [N]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewards.base import ScoreBatch, ScorerInfo, register
from rewards.models._preprocess import check_batch, existing, torch_dtype


class ClipSimilarity:
    """Scaled cosine between CLIP image and prompt embeddings; `scale=None` uses the model's logit scale."""

    def __init__(
        self,
        name: str,
        *,
        weights: str | Path,
        processor: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        scale: float | str | None = None,
        clamp_at_zero: bool = False,
    ) -> None:
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        self.name = name
        path = existing(weights, f"{name}: weights")
        proc_path = existing(processor, f"{name}: processor") if processor else path
        self.device = torch.device(device)
        model = CLIPModel.from_pretrained(path, dtype=torch_dtype(dtype))
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' .to stub
        self.tokenizer = CLIPTokenizer.from_pretrained(proc_path)
        self.image_processor = CLIPImageProcessorPil.from_pretrained(proc_path)
        self.scale = None if scale is None else float(scale)
        self.clamp_at_zero = clamp_at_zero
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.version = f"{name}/{path.name}"

    def info(self) -> ScorerInfo:
        return ScorerInfo(
            name=self.name,
            version=self.version,
            heads=[self.name],
            input_size=int(self.model.config.vision_config.image_size),
            max_batch=32,
        )

    @torch.inference_mode()
    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        check_batch(self.name, images, prompts)
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixels.to(self.device, self.model.dtype),
        )
        # image_embeds / text_embeds come back L2-normalised, so the row-wise dot is the cosine.
        cos = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)
        if self.clamp_at_zero:
            cos = cos.clamp(min=0.0)
        scale = self.model.logit_scale.exp().float() if self.scale is None else self.scale
        return ScoreBatch(scores={self.name: (scale * cos).cpu().numpy().astype(np.float32)})


@register("pickscore")
def pickscore(**kwargs: Any) -> ClipSimilarity:
    """PickScore: exp(logit_scale) · cosine, from a local `CLIPModel` folder (`weights`)."""
    return ClipSimilarity("pickscore", **kwargs)


@register("clipscore")
def clipscore(*, w: float | str = 2.5, **kwargs: Any) -> ClipSimilarity:
    """CLIPScore: w · max(cosine, 0) (Hessel et al.), from a local `CLIPModel` folder (`weights`)."""
    return ClipSimilarity("clipscore", scale=float(w), clamp_at_zero=True, **kwargs)


# Published architectures, for timing at native size with random weights.
# fmt: off
_NATIVE = {
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the base of PickScore_v1.
    "pickscore": dict(
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    patch_size=14, image_size=224, hidden_act="gelu"),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  vocab_size=49408, hidden_act="gelu"),
        projection_dim=1024,
    ),
    # openai/clip-vit-base-patch32.
    "clipscore": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    patch_size=32, image_size=224),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                  vocab_size=49408),
        projection_dim=512,
    ),
}
_TINY = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                image_size=32),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    projection_dim=16,
)
# fmt: on


def random_checkpoint(name: str, root: str | Path, *, native: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write a randomly initialised CLIP folder (model, byte-level tokenizer, PIL processor) under `root`
    and return the `make_scorer(name, **kwargs)` arguments. `native`: the published architecture of `name`
    (for timing), else a tiny one (for tests)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    arch: dict[str, Any] = _NATIVE[name] if native else _TINY
    chars = list(bytes_to_unicode().values())
    # Byte-level vocabulary without merges: every text tokenizes, one token per character.
    names = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(names)}
    ids = {"vocab_size": len(vocab), "bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1}
    text_cfg = {**ids, **arch["text"]}
    config = CLIPConfig(
        text_config=text_cfg, vision_config=arch["vision"], projection_dim=arch["projection_dim"]
    )
    torch.manual_seed(seed)
    folder = Path(root) / f"{name}-{'native' if native else 'tiny'}"
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    size = int(arch["vision"]["image_size"])
    crop = {"height": size, "width": size}
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop).save_pretrained(folder)
    return {"weights": str(folder)}
