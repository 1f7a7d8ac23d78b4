"""bf16 products on a CPU: the `autocast` setting shared by the learner and the rollout engine.

A CPU with bf16 dot-product instructions (AVX512-BF16, AMX) multiplies bf16 matrices about 3x faster than
float32 ones; one without them converts and is slower than float32. So `auto` turns bf16 on only on a CPU
with those instructions, and a run's numerics then depend on the CPU it runs on (as its speed does).
`bfloat16` autocasts on any device; GPUs usually get their low precision from the parameters themselves
(`learner.param_dtype`, the rollout engine's BF16 copy), so `auto` leaves them as they are.

    with autocast_context("auto", torch.device("cpu")):
        v = model(x, t, text, mask)      # bf16 products on an AVX512-BF16 CPU, float32 elsewhere
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal, get_args

import torch

Autocast = Literal["none", "bfloat16", "auto"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16, or AMX tiles), as torch probes it."""
    return bool(torch.cpu._is_avx512_bf16_supported()) or bool(torch.cpu._is_amx_tile_supported())


def resolve(setting: Autocast, device: torch.device) -> bool:
    """Whether `setting` turns bf16 autocast on for computation on `device`."""
    if setting not in get_args(Autocast):
        raise ValueError(f"autocast: {setting!r} is not one of {', '.join(get_args(Autocast))}")
    if setting == "auto":
        return device.type == "cpu" and cpu_has_native_bf16()
    return setting == "bfloat16"


def autocast_context(setting: Autocast, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """torch.autocast to bf16 on `device` when `resolve` says so, else a no-op context."""
    if resolve(setting, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
