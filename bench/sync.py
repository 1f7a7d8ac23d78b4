"""Weight sync bytes/s, learner -> generator: the object store path (and, on GPUs, NCCL).

    sana-rl bench sync --quick     # tiny DiT and one 1.6B block (~170 MB bf16); < 60 s on 2 CPU cores
    sana-rl bench sync             # tiny DiT and the whole 1.6B DiT (3.2 GB bf16; needs ~4x that in RAM:
                                   # snapshot, object store copy, pickled baseline, generator parameters)

A sync is timed from the learner's snapshot to the generator having copied every tensor into its own
parameters (`WeightSync.publish` + `deliver` into an actor that `copy_`s into preallocated tensors). The
baseline is the same sync with the snapshot put as plain torch tensors, which Ray pickles by copying
their storage (what a plain `ray.put(snapshot)` does). Target: >= 1 GB/s. The collective path is timed
with gloo on CPU for reference; NCCL needs two GPUs and is skipped with that reason elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.records import WeightSnapshot
from bench.harness import Row, Timing, measure, measure_pair
from orchestrator.weight_channel import WeightEndpoint
from orchestrator.weight_sync import WeightSync, state_nbytes

SUITE = "sync"
TARGET_GBPS = 1.0


class Receiver(WeightEndpoint):
    """A generator's side: parameters preallocated once, each sync copies into them."""

    def __init__(self, shapes: dict[str, tuple[list[int], str]]) -> None:
        self.params = {k: torch.empty(s, dtype=getattr(torch, d)) for k, (s, d) in shapes.items()}
        self.version = -1

    def load_weights(self, snapshot: WeightSnapshot) -> int:
        for name, t in snapshot.state.items():
            self.params[name].copy_(t)
        self.version = snapshot.policy_version
        return self.version


class Sender(WeightEndpoint):
    """Learner rank 0's side of the collective path."""

    def __init__(self, shapes: dict[str, tuple[list[int], str]], version: int = 0) -> None:
        state = {k: torch.ones(s, dtype=getattr(torch, d)) for k, (s, d) in shapes.items()}
        if torch.cuda.is_available():
            state = {k: v.cuda() for k, v in state.items()}
        self.snapshot = WeightSnapshot(policy_version=version, state=state)

    def weights_snapshot(self) -> WeightSnapshot:
        return self.snapshot


def dit_state(preset: str, depth: int | None) -> dict[str, torch.Tensor]:
    """A bf16 state dict with the preset's names and shapes (values uninitialised: only bytes matter)."""
    from policy.sana import SanaConfig, SanaDiT

    cfg = SanaConfig.preset(preset)  # type: ignore[arg-type]
    if depth is not None:
        cfg.depth = depth
    with torch.device("meta"):
        model = SanaDiT(cfg)
    return {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in model.state_dict().items()}


def _gbps(nbytes: int, t: Timing) -> float:
    return nbytes / t.median_s / 1e9


def _object_store_row(
    case: str, state: dict[str, torch.Tensor], handle: Any, quick: bool, note: str, judged: bool
) -> Row:
    import ray

    sync = WeightSync()
    version = [0]

    def ours() -> None:
        version[0] += 1
        sync.deliver([handle], sync.publish(WeightSnapshot(policy_version=version[0], state=state)))

    def base() -> None:
        version[0] += 1
        ref = ray.put(WeightSnapshot(policy_version=version[0], state=state))
        assert ray.get(handle.load_weights.remote(ref)) == version[0]

    t_ours, t_base = measure_pair(ours, base, warmup=1, repeats=3 if quick else 5)
    nbytes = state_nbytes(state)
    value, baseline = _gbps(nbytes, t_ours), _gbps(nbytes, t_base)
    return Row(
        suite=SUITE, case=case, metric="GB/s (put + load into a generator actor)", value=value,
        baseline_name="ray.put of plain torch tensors", baseline=baseline, ratio=value / baseline,
        target=f"value >= {TARGET_GBPS:g} GB/s" if judged else "", met=value >= TARGET_GBPS if judged else None,
        spread=value * t_ours.iqr_s / t_ours.median_s,
        note=note if judged else f"{note}; latency-bound at this size ({t_ours.median_s * 1e3:.0f} ms a sync), not judged",
        extra={"bytes": float(nbytes), "ms": t_ours.median_s * 1e3},
    )  # fmt: skip


def _collective_row(backend: str, shapes: dict[str, tuple[list[int], str]], nbytes: int, quick: bool) -> Row:
    import ray

    gpu = 1 if backend == "nccl" else 0
    sender: Any = ray.remote(num_cpus=0, num_gpus=gpu)(Sender).remote(shapes)
    receiver: Any = ray.remote(num_cpus=0, num_gpus=gpu)(Receiver).remote(shapes)
    try:
        sync = WeightSync(backend, timeout_s=300)  # type: ignore[arg-type]
        sync.connect(sender, [receiver])
        t = measure(lambda: sync.broadcast(rewind=True), warmup=1, repeats=3 if quick else 5)
    finally:
        ray.kill(sender)
        ray.kill(receiver)
    value = _gbps(nbytes, t)
    judged = backend == "nccl"
    return Row(
        suite=SUITE, case=f"collective ({backend})", metric="GB/s (broadcast + load)", value=value,
        target=f"value >= {TARGET_GBPS:g} GB/s" if judged else "", met=value >= TARGET_GBPS if judged else None,
        spread=value * t.iqr_s / t.median_s,
        note="" if judged else "one 1.6B block over gloo on loopback: a CPU reference for the collective path, not judged",
        extra={"bytes": float(nbytes), "ms": t.median_s * 1e3},
    )  # fmt: skip


def run(quick: bool) -> list[Row]:
    import ray

    from orchestrator.cluster import start_local

    started = not ray.is_initialized()
    if started:
        start_local(num_cpus=2)
    rows: list[Row] = []
    big_note = (
        "one 1.6B block + embeddings (quick mode; the full 1.6B DiT is 3.2 GB)"
        if quick
        else "the 1.6B DiT, bf16"
    )
    cases = [
        ("tiny DiT", dit_state("tiny", None), "tiny preset, bf16", False),
        ("1.6B", dit_state("1.6B", 1 if quick else None), big_note, True),
    ]
    try:
        shapes: dict[str, tuple[list[int], str]] = {}
        for case, state, note, judged in cases:
            shapes = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
            handle: Any = ray.remote(num_cpus=0)(Receiver).remote(shapes)
            try:
                rows.append(_object_store_row(f"object store, {case}", state, handle, quick, note, judged))
            finally:
                ray.kill(handle)
        # collective: the 1.6B layout on GPUs; on CPU (gloo, a reference only) one block, to spare memory
        if torch.cuda.device_count() >= 2:
            rows.append(_collective_row("nccl", shapes, state_nbytes(cases[-1][1]), quick))
        block = dit_state("1.6B", 1)
        block_shapes = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in block.items()}
        rows.append(_collective_row("gloo", block_shapes, state_nbytes(block), quick))
        if torch.cuda.device_count() < 2:
            skipped = "skipped: NCCL needs two GPUs (one rank per device)"
            rows.append(
                Row(suite=SUITE, case="collective (nccl)", metric="GB/s", value=float("nan"), note=skipped)
            )
    finally:
        if started:
            ray.shutdown()
    return rows


if __name__ == "__main__":
    for r in run(quick=True):
        print(f"{r.case:<28} {r.value:8.3f} {r.metric}  base {r.baseline}  {r.note}")
