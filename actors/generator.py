"""Rollout generation: quantized policy copies, a prompt-embedding cache and the image decoder.

`RolloutEngine` is the transport-free core (also used in-process for evaluation in SFT/pretraining);
`RolloutGenerator` is the Ray actor around it. Generation is a pure function of (weights version,
prompts, seeds, steps, precision), so Ray may deliver a call twice without harm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from actors.records import Rollouts, WeightSnapshot
from kernels.quantize import Format, QuantConfig, quantize_policy, requantize_
from orchestrator.weight_channel import WeightEndpoint
from policy.autocast import Autocast, autocast_context
from policy.codecs import CodecConfig, build_image_codec, build_text_encoder, to_uint8
from policy.flow import SamplerConfig, sample
from policy.sana import ModelConfig, SanaDiT, build_policy


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StaleWeights(RuntimeError):
    """The generator holds another policy version than the caller expects (e.g. after a restart)."""


@dataclass(kw_only=True, slots=True)
class GenerateRequest:
    """One generator call: N samples, grouped by prompt."""

    prompts: list[str]  # [N]
    seeds: list[int]  # [N]
    group_ids: list[int]  # [N]
    steps: int
    precision: Format
    expect_version: int
    """The policy version the caller believes the generator holds; a mismatch raises StaleWeights."""
    return_trajectory: bool = False
    noise_level: float | None = None
    """Overrides the sampler's SDE noise level (GRPO rollouts); None keeps the recipe's."""
    evaluation: bool = False
    """An evaluation sample: computed without `rollout.autocast` (float32 products on a CPU), so that
    before/after are measured alike whichever CPU and setting trained."""


class _BatchDynamic(torch.nn.Module):
    """Calls a compiled rollout copy with the batch dimension of its inputs marked dynamic: one graph per
    precision then serves the preview, final and evaluation batch sizes. (Left to automatic dynamic
    shapes, the first size compiles a static graph and the second a dynamic one: one compile more.)"""

    def __init__(self, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        for a in args:
            torch._dynamo.maybe_mark_dynamic(a, 0)
        return cast(torch.Tensor, self.compiled(*args))


class RolloutEngine:
    """Holds the full-precision policy, quantized copies per format, the codecs and the text cache."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        codec_cfg: CodecConfig,
        sampler_cfg: SamplerConfig,
        quant_cfg: QuantConfig,
        formats: list[Format],
        device: str | torch.device = "cpu",
        compile: bool = False,
        autocast: Autocast = "none",
    ) -> None:
        self.sampler_cfg = sampler_cfg
        self.compile = compile
        self.device = torch.device(device)
        self.autocast: Autocast = autocast
        # On a GPU the full-precision copy *is* BF16 (Sol-RL's regeneration precision; fp32 would double
        # the memory and halve the speed). On a CPU it stays float32: bf16 products are slower than float32
        # ones without bf16 instructions, and where they exist `autocast` runs the products in bf16.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.policy: SanaDiT = build_policy(replace(model_cfg, pretrained=None)).to(self.device, dtype).eval()
        self.policy.requires_grad_(False)  # never trained here; its copies and compiled graphs agree on it
        self.text_encoder = build_text_encoder(codec_cfg, self.device)
        self.codec = build_image_codec(codec_cfg, self.device, dtype)
        arch = self.policy.cfg
        side = codec_cfg.image_size // (self.codec.downsample)
        self.latent_shape = (arch.in_channels, side, side)
        self.quant_cfg = quant_cfg
        self.copies: dict[str, torch.nn.Module] = {}
        self.formats = sorted(set(formats))
        self._compiled: dict[str, torch.nn.Module] = {}
        self.version = -1

    @torch.no_grad()
    def load_weights(self, snapshot: WeightSnapshot) -> int:
        """Load a full state dict and re-quantize every rollout copy (in place after the first time)."""
        self.policy.load_state_dict(snapshot.state)
        for fmt in self.formats:
            if fmt == "bf16":
                continue
            if fmt not in self.copies:
                self.copies[fmt], _ = quantize_policy(self.policy, replace(self.quant_cfg, fmt=fmt))
            else:
                requantize_(self.copies[fmt], self.policy.state_dict())
        self.version = snapshot.policy_version
        return self.version

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings [N, L, Dc] and masks [N, L] on this engine's device; the text encoder's
        memo (`codec.embedding_memo_mib` or `embedding_cache`) spares re-encoding repeated prompts.
        A rollout request repeats each prompt once per seed: each distinct one is fetched and moved once."""
        distinct = list(dict.fromkeys(prompts))
        emb, mask = (t.to(self.device) for t in self.text_encoder.encode(distinct))
        if len(distinct) == len(prompts):
            return emb, mask
        row = {p: i for i, p in enumerate(distinct)}
        index = torch.tensor([row[p] for p in prompts], device=self.device)
        return emb[index], mask[index]

    def _runner(self, precision: str) -> torch.nn.Module:
        """The module that samples in `precision`: the copy itself, or its compiled wrapper.

        The wrapper is built once per precision and never replaces the copy, whose state dict (and so
        `load_weights`, which updates it in place) stays as it is; Inductor reads parameters and buffers as
        graph inputs, so a sync needs no recompilation.
        """
        model = self.policy if precision == "bf16" else self.copies[precision]
        if not self.compile:
            return model
        if precision not in self._compiled:
            self._compiled[precision] = _BatchDynamic(cast(torch.nn.Module, torch.compile(model)))
        return self._compiled[precision]

    @torch.no_grad()
    def generate(self, req: GenerateRequest) -> Rollouts:
        if req.expect_version != self.version:
            raise StaleWeights(
                f"generator holds policy version {self.version}, caller expects {req.expect_version}"
            )
        if not (len(req.prompts) == len(req.seeds) == len(req.group_ids)):
            raise ValueError("prompts, seeds and group_ids must have the same length")
        t0 = time.perf_counter()
        model = self._runner(req.precision)
        text, mask = self.encode(req.prompts)
        cfg = replace(self.sampler_cfg, steps=req.steps)
        if req.noise_level is not None:
            cfg = replace(cfg, noise_level=req.noise_level)
        uncond = None
        if cfg.guidance_scale != 1.0:
            ut, um = self.encode([""])
            uncond = (ut.expand_as(text), um.expand_as(mask))
        with autocast_context("none" if req.evaluation else self.autocast, self.device):
            result = sample(
                model,
                seeds=req.seeds,
                text=text,
                text_mask=mask,
                cfg=cfg,
                latent_shape=self.latent_shape,
                uncond_text=uncond[0] if uncond else None,
                uncond_mask=uncond[1] if uncond else None,
                return_trajectory=req.return_trajectory,
            )
        images = to_uint8(self.codec.decode(result.x0))

        def host(t: torch.Tensor | None) -> Any:  # records leave the actor on the CPU, in float32
            return None if t is None else t.cpu().float() if t.is_floating_point() else t.cpu()

        return Rollouts(
            policy_version=self.version,
            precision=req.precision,
            steps=req.steps,
            prompts=list(req.prompts),
            group_ids=torch.tensor(req.group_ids, dtype=torch.int64),
            seeds=torch.tensor(req.seeds, dtype=torch.int64),
            text=host(text),
            text_mask=host(mask),
            latents=host(result.x0),
            images=np.ascontiguousarray(images),
            trajectory=host(result.trajectory),
            sigmas=host(result.sigmas),
            log_probs=host(result.log_probs),
            sde_mask=host(result.sde_mask),
            seconds=time.perf_counter() - t0,
        )


class RolloutGeneratorActor(WeightEndpoint):
    """Ray actor shell around RolloutEngine; created as `generator-{i}` by the controller. A receiver of the
    collective weight sync (`weights_recv` loads through `load_weights`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from actors.base import default_device

        torch.set_num_threads(max(1, int(kwargs.pop("num_threads", 1))))
        if torch.cuda.is_available():  # Ray narrowed CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.cuda.set_device(0)
        kwargs.setdefault("device", default_device())
        self.engine = RolloutEngine(*args, **kwargs)
        self.images_generated = 0
        self.seconds = 0.0

    def ready(self) -> int:
        return self.engine.version

    def load_weights(self, snapshot: WeightSnapshot) -> int:
        return self.engine.load_weights(snapshot)

    def generate(self, req: GenerateRequest) -> Rollouts:
        t0 = time.perf_counter()
        out = self.engine.generate(req)
        self.seconds += time.perf_counter() - t0
        self.images_generated += len(out)
        return out

    def digest(self) -> tuple[int, str]:
        """(version, hash of the full-precision weights): lets the controller prove the sync landed."""
        return self.engine.version, state_digest(self.engine.policy.state_dict())

    def stats(self) -> dict[str, float]:
        return {"images": float(self.images_generated), "seconds": self.seconds}

    def pid(self) -> int:
        import os

        return os.getpid()
