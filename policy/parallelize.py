"""FSDP2 for the Sana DiT: activation checkpointing and torch.compile per block, then `fully_shard` per
block and finally the root (the torchtitan order: AC, compile, FSDP).

Mixed precision is FSDP2's: parameters are all-gathered in `param_dtype` for compute while the sharded
masters keep the model's own dtype (float32), gradients are reduce-scattered in `reduce_dtype`. The root
does not cast its inputs: the timestep (σ·1000) would lose its low digits in bf16, and the network already
casts latents and text to its compute dtype itself.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

DType = Literal["float32", "bfloat16", "float16"]

# Prefixes that wrappers insert into parameter names; checkpoints and snapshots use the bare names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """The parameter's name in the bare model: wrapper prefixes (AC, compile) removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parallelize(
    model: nn.Module,
    mesh: torch.distributed.device_mesh.DeviceMesh,
    *,
    param_dtype: DType = "bfloat16",
    reduce_dtype: DType = "float32",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Shard `model` (anything with a `blocks` ModuleList) over `mesh` in place; returns it.

    Every FSDP unit reshards after forward, the root included. The learner swaps the old and reference
    policies' values into the shards between forwards, which is only correct when no unit keeps an
    unsharded copy from the previous forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"parallelize: {type(model).__name__} has no `blocks` ModuleList to shard")
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            # No dropout or sampling inside a block: recomputation needs no saved RNG state.
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in blocks:
            block.compile(fullgraph=True)
    mp = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype)
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    root_mp = MixedPrecisionPolicy(
        param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, output_dtype=torch.float32,
        cast_forward_inputs=False,
    )  # fmt: skip
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=True)
    return model


__all__ = ["DType", "clean_name", "parallelize"]
