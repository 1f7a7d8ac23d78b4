"""`aesthetic`: the LAION aesthetic predictor, a head on the L2-normalised CLIP ViT-L/14 image embedding.

Two published heads, told apart by their state-dict keys:
- improved-aesthetic-predictor (christophschuhmann), `sac+logos+ava1-l14-linearMSE.pth`: an MLP
  768-1024-128-64-16-1 with dropout between the first layers and no activations, keys
  `layers.{0,2,4,6,7}.{weight,bias}`; the head DDPO and most diffusion-RL papers train against.
- LAION-AI/aesthetic-predictor, `sa_0_4_vit_l_14_linear.pth`: one Linear(768, 1), keys `weight`, `bias`.
Scores are on the 1-10 rating scale of the training data. The embedding is OpenAI CLIP's `encode_image`:
transformers' `vision_model` pooled output through `visual_projection`, on pixels prepared as OpenAI
CLIP's transform does (PIL bicubic resize, centre crop).

Example:
    scorer = make_scorer("aesthetic", weights="/ckpt/sac+logos+ava1-l14-linearMSE.pth",
                         clip="/ckpt/clip-vit-large-patch14")
    scorer.score(images_uint8_nhwc, prompts).scores["aesthetic"]  # float32 [N], about 1..10
"""

from __future__ import annotations

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


def preference_mlp(in_dim: int) -> nn.Sequential:
    """The improved-aesthetic-predictor MLP (also ImageReward's head): linear layers only, dropout between.

    Indices match the published state dicts: `layers.0` (in->1024), `.2` (1024->128), `.4` (128->64),
    `.6` (64->16), `.7` (16->1); 1, 3, 5 are dropout (inactive in eval).
    """
    return nn.Sequential(
        nn.Linear(in_dim, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )  # fmt: skip


@register("aesthetic")
class AestheticPredictor:
    """LAION aesthetic score from a head file (`weights`) and a local CLIP ViT-L/14 folder (`clip`)."""

    def __init__(
        self, *, weights: str | Path, clip: str | Path, device: str = "cpu", dtype: str = "float32"
    ) -> None:
        from transformers import CLIPModel

        head_path = existing(weights, "aesthetic: weights")
        state = load_state_dict(head_path)
        if "weight" in state:
            head: nn.Module = nn.Linear(state["weight"].shape[1], 1)
        elif "layers.0.weight" in state:
            head = nn.Sequential(OrderedDict(layers=preference_mlp(state["layers.0.weight"].shape[1])))
        else:
            raise ValueError(
                f"aesthetic: {head_path} is neither the linear nor the MLP head: {sorted(state)[:4]}"
            )
        load_strict(head, state, f"aesthetic: {head_path}")
        self.head = head
        # The published CLIP folder is a full CLIPModel; only the image tower and its projection are kept.
        model = CLIPModel.from_pretrained(existing(clip, "aesthetic: clip"), dtype=torch_dtype(dtype))
        self.vision = model.vision_model
        self.projection = model.visual_projection
        if self.projection.out_features != next(self.head.parameters()).shape[-1]:
            raise ValueError(
                f"aesthetic: the head takes {next(self.head.parameters()).shape[-1]}-d embeddings but the CLIP"
                f" projects to {self.projection.out_features}"
            )
        self.device = torch.device(device)
        for module in (self.vision, self.projection, self.head):
            module.to(self.device).eval()
        self.size = int(model.config.vision_config.image_size)  # type: ignore[union-attr,arg-type]
        self.version = f"aesthetic/{head_path.stem}"

    def info(self) -> ScorerInfo:
        return ScorerInfo(
            name="aesthetic", version=self.version, heads=["aesthetic"], input_size=self.size, max_batch=64
        )

    @torch.inference_mode()
    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        check_batch("aesthetic", images, prompts)
        pixels = clip_pixels(images, self.size, resample="pil").to(self.device, self.projection.weight.dtype)
        emb = self.projection(self.vision(pixel_values=pixels).pooler_output).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        head_dtype = next(self.head.parameters()).dtype
        rating = self.head(emb.to(head_dtype)).squeeze(-1).float()
        return ScoreBatch(scores={"aesthetic": rating.cpu().numpy().astype(np.float32)})


def random_checkpoint(name: str, root: str | Path, *, native: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write a random CLIP folder and MLP head in the published layouts under `root`; return the
    `make_scorer("aesthetic", **kwargs)` arguments. `native`: CLIP ViT-L/14 (for timing), else tiny."""
    from transformers import CLIPConfig, CLIPModel

    if native:  # openai/clip-vit-large-patch14
        vision = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
        )
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        dim = 768
    else:
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=8,
            image_size=32,
        )
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        dim = 16
    torch.manual_seed(seed)
    folder = Path(root) / f"aesthetic-clip-{'native' if native else 'tiny'}"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)).save_pretrained(folder)
    head = nn.Sequential(OrderedDict(layers=preference_mlp(dim)))
    head_path = Path(root) / "aesthetic-head.pth"
    torch.save(head.state_dict(), head_path)
    return {"weights": str(head_path), "clip": str(folder)}
