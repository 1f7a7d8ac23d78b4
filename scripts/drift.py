"""Measure how far quantized rollout copies drift from the full-precision Sana policy.

    .venv/bin/python scripts/drift.py                                   # tiny preset, random weights
    .venv/bin/python scripts/drift.py --formats nvfp4 fp8 --noise-level 0.7 --steps 10
    .venv/bin/python scripts/drift.py --preset 1.6B --pretrained /models/sana_1600m --min-dim 2240 --device cuda

Prints, per format, the velocity error per denoising step, the final-latent error and (with
--noise-level > 0) the SDE log-prob gap (kernels/drift.py). Text conditioning is random embeddings of the
preset's caption width; a randomly initialised policy gets a non-zero output layer (Sana initialises it
to zero, which would make every format agree trivially). No reward scorer is attached here: pass one to
`kernels.drift.measure_drift` for the rank correlation.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernels.drift import measure_drift
from kernels.quantize import QuantConfig, quantize_policy
from policy.flow import SamplerConfig
from policy.sana import ModelConfig, build_policy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "0.6B", "1.6B", "4.8B"])
    p.add_argument("--pretrained", default=None, help="local diffusers directory or original .pth")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["bf16", "fp8", "w4a16", "nvfp4"],
        choices=["bf16", "fp8", "w4a16", "nvfp4"],
    )
    p.add_argument("--min-dim", type=int, default=0, help="Sol-RL uses 2240; 0 quantizes the tiny preset too")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--noise-level", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model_cfg = ModelConfig(preset=args.preset, pretrained=args.pretrained)
    policy = build_policy(model_cfg).to(device).eval()
    if args.pretrained is None:
        with torch.no_grad():
            torch.nn.init.normal_(policy.final_layer.linear.weight, std=0.02)
    cfg = policy.cfg
    text = torch.randn(args.seeds, 16, cfg.caption_channels, device=device)
    mask = torch.ones(args.seeds, 16, dtype=torch.bool, device=device)
    sampler = SamplerConfig(steps=args.steps, noise_level=args.noise_level)
    latent = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    for fmt in args.formats:
        qmodel, report = quantize_policy(policy, QuantConfig(fmt=fmt, min_dim=args.min_dim))
        drift = measure_drift(
            policy,
            qmodel,
            seeds=list(range(args.seeds)),
            text=text,
            text_mask=mask,
            cfg=sampler,
            latent_shape=latent,
        )
        got, bf16 = report.weight_bytes()
        print(f"== {fmt}: {len(report.replaced)} Linears quantized, Linear weights {got / bf16:.3f}x of BF16")
        print(drift.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
