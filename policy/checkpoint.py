"""Sharded learner checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint directory holds the DCP shards of the model, the optimizer and the extra policies the
objective keeps (the old/EMA and reference copies, sharded like the parameters), one RNG file per rank,
`meta.json` (counters) and, last, the `COMPLETE` marker. Every rank writes into `.tmp-<name>` beside the
target; rank 0 renames it only when all ranks are done, so a crash mid-save leaves a temp folder that
`latest_complete` never returns. DCP reshards on load: a checkpoint from 2 ranks loads on 1.

    save_checkpoint(root / "step-0000010", model=m, optimizer=o, slots={"old": old}, meta={...}, rank=r)
    path = latest_complete(root)   # newest complete step-* folder, or None
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

COMPLETE = "COMPLETE"
META = "meta.json"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


@contextmanager
def atomic_dir(path: Path, rank: int = 0) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success rank 0 marks it complete and renames it to `path`.

    All ranks enter and leave together (barriers); only rank 0 touches the file system's names.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    yield tmp
    _barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text("ok\n")
        if path.exists():  # re-saving the same step: move the old copy away first, drop it after
            stale = path.parent / f".old-{path.name}"
            shutil.rmtree(stale, ignore_errors=True)
            path.rename(stale)
            tmp.rename(path)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(path)
    _barrier()


def is_complete(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / COMPLETE).is_file() and not Path(path).name.startswith(".")


def latest_complete(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root` (by name: use zero-padded step numbers)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if is_complete(p))
    return done[-1] if done else None


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and any abandoned temp folders."""
    root = Path(root)
    done = sorted(p for p in root.iterdir() if is_complete(p))
    doomed = done[: max(len(done) - keep, 0)] + [p for p in root.glob(".tmp-*") if p.is_dir()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _states(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    slots: dict[str, dict[str, torch.Tensor]],
    with_optim: bool,
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model), "slots": slots}
    if with_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    slots: dict[str, dict[str, torch.Tensor]],  # slot -> param name -> tensor sharded like the param
    meta: dict[str, Any],
    rank: int,
) -> Path:
    """Collective: every rank calls it with its shards. Returns the final path."""
    import torch.distributed.checkpoint as dcp

    # An optimizer that has not stepped has no state; asking DCP for it would run a zero-lr step that
    # advances Adam's step count and changes the run. Such a checkpoint simply carries no optimizer.
    with_optim = bool(optimizer.state)
    path = Path(path)
    with atomic_dir(path, rank) as tmp:
        torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
        dcp.save(_states(model, optimizer, slots, with_optim), checkpoint_id=str(tmp))
        if rank == 0:
            full_meta = {**meta, "slots": sorted(slots), "with_optim": with_optim}
            (tmp / META).write_text(json.dumps(full_meta, indent=2))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    return dict(json.loads((path / META).read_text()))


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    slots: dict[str, dict[str, torch.Tensor]],
    rank: int,
) -> dict[str, Any]:
    """Collective: load shards (resharding if the world size changed) into model, optimizer and slots
    in place; restores this rank's RNG when the checkpoint has one for it. Returns the meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = read_meta(path)
    if sorted(slots) != meta["slots"]:
        raise ValueError(f"{path}: holds policies {meta['slots']}, the learner keeps {sorted(slots)}")
    state = _states(model, optimizer, slots, meta["with_optim"])
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if meta["with_optim"]:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    else:
        optimizer.state.clear()
    rng = path / f"rng-rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_diffusers(state: dict[str, torch.Tensor], arch: Any, path: str | Path) -> Path:
    """Write full SanaDiT weights (LoRA already merged) as a diffusers `SanaTransformer2DModel` folder,
    atomically. Call on one process only."""
    from policy.sana import SanaDiT

    with torch.device("meta"):
        model = SanaDiT(arch)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"export: state does not fit SanaDiT({arch}): {exc}") from None
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


__all__ = [
    "COMPLETE",
    "atomic_dir",
    "export_diffusers",
    "is_complete",
    "latest_complete",
    "load_checkpoint",
    "prune",
    "read_meta",
    "save_checkpoint",
]
