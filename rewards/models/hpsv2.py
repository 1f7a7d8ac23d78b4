"""`hpsv2`: Human Preference Score v2 / v2.1 (Wu et al., 2023, arXiv 2306.09341).

HPS is OpenCLIP ViT-H-14 fine-tuned on human preference pairs; the score is the cosine between the
normalised image and prompt features (`hpsv2.img_score.score`: about 0.2-0.35 for ordinary images).

We do not import open_clip: it needs torchvision, which cannot sit beside our torch build. `OpenClipViT`
below is a plain-torch copy of the open_clip `CLIP` forward (standard ViT towers, nn.GELU, pre-LN
residual blocks, cls-token pooling, text pooled at the end-of-text token) whose parameter names and shapes
are open_clip's, so the published `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` ({'state_dict': ...})
loads into it strictly. The architecture is read from the checkpoint's shapes; only the head widths are
not in the shapes (ViT-H-14: 80 for the image tower, 64 for the text tower). The tokenizer is open_clip's
BPE (`bpe_simple_vocab_16e6.txt.gz`, shipped in the `hpsv2x` and `open-clip-torch` packages), built into
a transformers `CLIPTokenizer` with the same ids. Pixels follow HPSv2's validation transform: tensor
first, antialiased bicubic resize of the shortest side, centre crop, CLIP mean/std.

Example:
    scorer = make_scorer("hpsv2", weights="/ckpt/HPS_v2.1_compressed.pt")  # vocab .gz beside it
    scorer.score(images_uint8_nhwc, prompts).scores["hpsv2"]  # float32 [N]
"""

from __future__ import annotations

import gzip
import html
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

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_CHECKPOINTS = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")


class _Block(nn.Module):
    """open_clip `ResidualAttentionBlock` (no layer scale): pre-LN attention and GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width))
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(nn.Module):
    """open_clip `VisionTransformer`: patch conv, class token, ln_pre, blocks, ln_post on the class token."""

    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int, mlp: int, dim: int):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, mlp)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # float [N, 3, S, S] -> [N, dim]
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [N, grid², width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipViT(nn.Module):
    """open_clip `CLIP` with ViT towers, parameter names as open_clip's. Build it with `from_state_dict`."""

    def __init__(self, *, embed_dim: int, vision: dict[str, int], text: dict[str, int]) -> None:
        super().__init__()
        self.visual = _Visual(dim=embed_dim, **vision)
        ctx, width = text["context_length"], text["width"]
        self.transformer = _Transformer(width, text["layers"], text["heads"], text["mlp"])
        self.token_embedding = nn.Embedding(text["vocab_size"], width)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros([]))
        self.context_length = ctx

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], *, vision_head_width: int = 80, text_head_width: int = 64
    ) -> dict[str, Any]:
        """Constructor arguments read from a checkpoint's shapes (head widths are not in the shapes)."""

        def depth(prefix: str) -> int:
            return sum(1 for k in state if k.startswith(prefix) and k.endswith(".ln_1.weight"))

        conv = state["visual.conv1.weight"]  # [width, 3, patch, patch]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = state["token_embedding.weight"].shape[1]
        vision = dict(
            image_size=grid * patch, patch=patch, width=width, layers=depth("visual.transformer."),
            heads=width // vision_head_width,
            mlp=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )  # fmt: skip
        text = dict(
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            width=text_width, layers=depth("transformer."), heads=text_width // text_head_width,
            mlp=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )  # fmt: skip
        return dict(embed_dim=state["text_projection"].shape[1], vision=vision, text=text)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [N, 3, S, S] -> L2-normalised float [N, embed_dim]."""
        return nn.functional.normalize(self.visual(pixels), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [N, context_length] (zero-padded) -> L2-normalised float [N, embed_dim]."""
        x = self.token_embedding(tokens) + self.positional_embedding
        causal = torch.full((x.shape[1], x.shape[1]), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.ln_final(self.transformer(x, causal))
        # The end-of-text token has the largest id, so argmax finds it (open_clip's pooling).
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection
        return nn.functional.normalize(x, dim=-1)


def open_clip_tokenizer(vocab_gz: Path) -> Any:
    """open_clip's `SimpleTokenizer` vocabulary as a transformers `CLIPTokenizer` (same ids, fast)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Exactly open_clip's construction: bytes, bytes + '</w>', merges, then the two special tokens.
    lines = gzip.open(vocab_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges: list[Any] = [tuple(line.split()) for line in lines if line]  # (left, right) pairs
    chars = list(bytes_to_unicode().values())
    names = [
        *chars,
        *(c + "</w>" for c in chars),
        *("".join(m) for m in merges),
        "<start_of_text>",
        "<end_of_text>",
    ]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(names)}, merges=merges,
        bos_token="<start_of_text>", eos_token="<end_of_text>", unk_token="<end_of_text>", pad_token="<end_of_text>",
    )  # fmt: skip


@register("hpsv2")
class HPSv2:
    """HPSv2(.1) from a local checkpoint (`weights`: the .pt file, or a folder holding it and the vocab)."""

    def __init__(
        self,
        *,
        weights: str | Path,
        tokenizer: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        vision_head_width: int | str = 80,
        text_head_width: int | str = 64,
    ) -> None:
        path = existing(weights, "hpsv2: weights")
        if path.is_dir():
            found = [path / name for name in _CHECKPOINTS if (path / name).exists()]
            if not found:
                raise ValueError(f"hpsv2: weights: {path} holds none of {', '.join(_CHECKPOINTS)}")
            path = found[0]
        vocab = existing(tokenizer or path.parent / VOCAB_FILE, "hpsv2: tokenizer")
        state = load_state_dict(path)
        try:
            arch = OpenClipViT.from_state_dict(
                state, vision_head_width=int(vision_head_width), text_head_width=int(text_head_width)
            )
        except KeyError as exc:
            raise ValueError(f"hpsv2: {path} is not an open_clip ViT checkpoint (no {exc})") from None
        with torch.device("meta"):  # the checkpoint's tensors are assigned: no random init of 1B params
            model = OpenClipViT(**arch)
        load_strict(model, state, f"hpsv2: {path}")
        self.device = torch.device(device)
        self.model = model.to(self.device, torch_dtype(dtype)).eval()
        self.tokenizer = open_clip_tokenizer(vocab)
        self.size = arch["vision"]["image_size"]
        self.version = f"hpsv2/{path.stem}"

    def info(self) -> ScorerInfo:
        return ScorerInfo(
            name="hpsv2", version=self.version, heads=["hpsv2"], input_size=self.size, max_batch=32
        )

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """int64 [N, context_length]: open_clip's `tokenize` (sot, BPE, eot, truncated, zero-padded)."""
        try:
            from ftfy import fix_text  # what open_clip's basic_clean does first (optional here)
        except ImportError:

            def fix_text(text: str) -> str:
                return text

        ctx = self.model.context_length
        texts = [html.unescape(html.unescape(fix_text(p))).strip() for p in prompts]
        ids = self.tokenizer(texts, truncation=True, max_length=ctx)["input_ids"]
        tokens = torch.zeros(len(ids), ctx, dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row)
        return tokens

    @torch.inference_mode()
    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        check_batch("hpsv2", images, prompts)
        dtype = self.model.text_projection.dtype
        pixels = clip_pixels(images, self.size, resample="tensor").to(self.device, dtype)
        img = self.model.encode_image(pixels).float()
        txt = self.model.encode_text(self.tokenize(prompts).to(self.device)).float()
        return ScoreBatch(scores={"hpsv2": (img * txt).sum(-1).cpu().numpy().astype(np.float32)})


_NATIVE = dict(  # ViT-H-14 as open_clip's model_configs/ViT-H-14.json
    embed_dim=1024,
    vision=dict(image_size=224, patch=14, width=1280, layers=32, heads=16, mlp=5120),
    text=dict(context_length=77, vocab_size=49408, width=1024, layers=24, heads=16, mlp=4096),
)
_TINY = dict(
    embed_dim=64,
    vision=dict(image_size=32, patch=8, width=160, layers=2, heads=2, mlp=640),
    text=dict(context_length=77, vocab_size=1024, width=128, layers=2, heads=2, mlp=512),
)


def random_checkpoint(name: str, root: str | Path, *, native: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write a random open_clip-layout checkpoint ({'state_dict': ...}) and a BPE vocab .gz under `root`;
    return the `make_scorer("hpsv2", **kwargs)` arguments. `native`: ViT-H-14 (for timing), else tiny
    (head widths 80 and 64, as ViT-H-14)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    arch = _NATIVE if native else _TINY
    chars = list(bytes_to_unicode().values())
    # Merges of character pairs fill the vocabulary to the model's size, as the real file does.
    n_merges = arch["text"]["vocab_size"] - 2 * len(chars) - 2  # type: ignore[index]
    merges = [f"{a} {b}" for a in chars for b in chars][:n_merges]
    folder = Path(root) / f"hpsv2-{'native' if native else 'tiny'}"
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / VOCAB_FILE, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *merges]) + "\n")
    torch.manual_seed(seed)
    model = OpenClipViT(**arch)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():  # zeros everywhere would make every score 0/0
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:
                p.uniform_(-0.1, 0.1)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
    torch.save({"state_dict": model.state_dict()}, folder / _CHECKPOINTS[0])
    return {"weights": str(folder)}
