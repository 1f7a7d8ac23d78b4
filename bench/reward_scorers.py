"""Reward model scorers: images/s of every registered model scorer at its native input size, through the
gRPC service against `scorer.score` in-process. Part of the `reward` suite (bench/reward.py runs it).

    sana-rl bench reward --quick      # tiny random configs
    sana-rl bench reward              # the published architectures (random weights) where they fit

Nothing is downloaded: each scorer module's `random_checkpoint` writes random weights in the published
layout to a temporary folder, at the real model's architecture (`native=True`) or a tiny one, and the
row's note says which. Images are smooth noise at the input size the built scorer asks for (composition:
shapes-world scenes with their captions; physics clips: a smooth image sliding 2 px a frame), batch 8,
one request in flight, sent the way the trainer sends them (RewardClientSync, no cache, raw scores).

- service: RewardClientSync -> RewardService (start_server on 127.0.0.1:0, max_batch 8) -> the scorer.
  The server runs on its own event-loop thread in this process and shares the scorer object with the
  baseline: one copy of a 1B-parameter tower fits beside the other engineers' jobs on a small box, two
  might not (the jpeg cases, where transport dominates, serve from a child process instead).
- baseline: `scorer.score(images, prompts)` in this process, timed interleaved with the service.
ratio = service / in-process; target >= 0.83x (the service costs at most 20%). Where the forward pass
dominates it should read ~1.0x; for the cheap numpy scorer the transport shows.

With CUDA present the neural scorers run on the GPU (`device="cuda"`, float32) and full mode builds every
published architecture; on a CPU the VLM judges stay tiny in full mode too (`_TOO_SLOW_ON_CPU`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Row, Timing, measure_pair
from bench.reward import TARGET, smooth_images
from rewards.base import SCORER_MODULES, RewardModel, make_scorer

SUITE = "reward"
BATCH = 8
CLIP_FRAMES, CLIP_SIZE = 8, 128  # physics clips: frames per clip, side (the scorer's flow size)
PHYSICS_CLIPS = "physics clips"
"""Case name of the physics scorer on clips (optical flow, no VLM); 'physics' is its image mode."""
SCORERS = (
    "composition", "clipscore", "aesthetic", "imagereward", "pickscore", "hpsv2", "vlm", "physics",
    PHYSICS_CLIPS,
)  # fmt: skip
PROMPTS = ["a photo of a red cat on a mat", "two blue dogs in the snow", "a painting of a lighthouse", ""]
# What `random_checkpoint(native=True)` builds, for the notes.
_NATIVE = {
    "clipscore": "CLIP ViT-B/32",
    "aesthetic": "CLIP ViT-L/14 + MLP head",
    "imagereward": "BLIP ViT-L/16 + BERT-base",
    "pickscore": "CLIP ViT-H/14",
    "hpsv2": "open_clip ViT-H-14",
    "vlm": "LLaVA CLIP ViT-L/14-336 + 0.5B Llama",
    "physics": "LLaVA CLIP ViT-L/14-336 + 0.5B Llama, 4 questions",
}
# At the native size a judge takes ~45 s per image and question on 2 busy cores (a 577-token image
# prompt through a 0.5B language model): 6 min a batch, 24 for physics' 4 questions.
_TOO_SLOW_ON_CPU = frozenset({"vlm", "physics"})
_BUDGET_S = {True: 3.0, False: 40.0}
"""Per mode (quick?): timed repeats per case are sized to take about this long (3 to 25 pairs)."""


def run(quick: bool, names: Sequence[str] = SCORERS) -> list[Row]:
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar per checkpoint written and read would bury the table
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in names:
        native = not quick and (device == "cuda" or name not in _TOO_SLOW_ON_CPU)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name.replace(' ', '-')}-") as root:
            t0 = time.perf_counter()
            scorer = _build(name, Path(root), native=native, device=device)
            build_s = time.perf_counter() - t0
            rows.append(_case(name, scorer, native, device, build_s, quick))
        del scorer
        gc.collect()  # the next scorer may be another billion parameters
    return rows


def _build(name: str, root: Path, *, native: bool, device: str) -> RewardModel:
    """The scorer with random weights written under `root` (no weights for composition, physics clips)."""
    if name == "composition":
        return make_scorer("composition")
    if name == PHYSICS_CLIPS:
        return make_scorer("physics")  # clips without a judge: temporal consistency alone
    module = importlib.import_module(f"rewards.models.{SCORER_MODULES[name]}")
    return make_scorer(name, device=device, **module.random_checkpoint(name, root, native=native))


def _inputs(name: str, scorer: RewardModel) -> tuple[np.ndarray, list[str]]:
    """uint8 [8, S, S, 3] at the scorer's input size (or [8, T, S, S, 3] clips) and 8 prompts."""
    prompts = (PROMPTS * BATCH)[:BATCH]
    if name == "composition":
        from orchestrator.shapes_world import generate

        scenes = generate(BATCH, seed=0, size=32)  # the world's native size
        return np.stack([s.render(32) for s in scenes]), [s.caption() for s in scenes]
    if name == PHYSICS_CLIPS:
        first = smooth_images(CLIP_SIZE, n=BATCH)
        return np.stack([np.roll(first, 2 * t, axis=2) for t in range(CLIP_FRAMES)], axis=1), prompts
    return smooth_images(_input_size(scorer), n=BATCH), prompts


def _input_size(scorer: RewardModel) -> int:
    """Side the scorer resizes to: its info, else (VLM judges) its image processor's crop."""
    size = scorer.info().input_size
    if size:
        return size
    judge: Any = getattr(scorer, "judge", scorer)  # physics asks its VLM judge
    return int(judge.backend.processor.image_processor.crop_size["height"])


@contextlib.contextmanager
def _served(scorer: RewardModel) -> Iterator[str]:
    """The scorer behind start_server on 127.0.0.1:0, on an event loop of its own thread; yields host:port."""
    from rewards.server import ServerConfig, start_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-reward-server", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        start_server(scorer, ServerConfig(max_batch=BATCH, max_wait_ms=2.0)), loop
    ).result()
    try:
        yield server.address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _case(name: str, scorer: RewardModel, native: bool, device: str, build_s: float, quick: bool) -> Row:
    from rewards.client import RewardClientConfig, RewardClientSync, RewardSpec

    images, prompts = _inputs(name, scorer)
    head = scorer.info().heads[0]
    with _served(scorer) as address:
        # One try, generous deadlines: a bench call that fails must raise, not retry behind the timing.
        spec = RewardSpec(name=name, scorer=scorer.info().name, address=address, normalize=False,
                          timeout_s=3600, max_attempts=1, retry_budget_s=3600)  # fmt: skip
        client = RewardClientSync(RewardClientConfig(rewards=[spec], cache_size=0, max_concurrency=1))
        try:
            # The first pair is the warm-up, and checks that the service answers what the scorer does.
            t0 = time.perf_counter()
            served = client.score_sync(images, prompts)
            local = scorer.score(images, prompts)
            first_s = time.perf_counter() - t0
            if not served.ok.all() or not np.allclose(served.raw[name], local.scores[head], atol=1e-4):
                raise RuntimeError(f"{name}: the service disagrees with the scorer: {served.errors}")
            repeats = int(np.clip(_BUDGET_S[quick] / first_s, 3, 25))
            t_service, t_local = measure_pair(
                lambda: client.score_sync(images, prompts),
                lambda: scorer.score(images, prompts),
                warmup=0,
                repeats=repeats,
            )
        finally:
            client.close()
    if name not in _NATIVE:
        config = "no weights"
    else:
        config = (_NATIVE[name] if native else "tiny config") + ", random weights"
    return _row(name, images, config, device, build_s, t_service, t_local)


def _row(
    name: str, images: np.ndarray, config: str, device: str, build_s: float, service: Timing, local: Timing
) -> Row:
    per_s = lambda t: BATCH / t.median_s  # noqa: E731
    ratio = per_s(service) / per_s(local)
    shape = f"{images.shape[1]}x{images.shape[2]}px" if images.ndim == 5 else f"{images.shape[1]}px"
    return Row(
        suite=SUITE,
        case=f"{name} {shape} batch {BATCH} via service",
        metric="images/s" if images.ndim == 4 else "clips/s",
        value=per_s(service),
        baseline_name="in-process scorer.score",
        baseline=per_s(local),
        ratio=ratio,
        target=f">= {TARGET:.2f}x",
        met=ratio >= TARGET,
        spread=per_s(service) * service.iqr_s / service.median_s,
        note=f"{config}; {device}; {1e3 * service.median_s:.0f} ms/batch served, "
        f"{1e3 * local.median_s:.0f} in-process; built in {build_s:.0f} s",
        extra={
            "service_ms_per_batch": 1e3 * service.median_s,
            "in_process_ms_per_batch": 1e3 * local.median_s,
            "service_overhead_ms": 1e3 * (service.median_s - local.median_s),
            "build_s": build_s,
            "repeats": float(service.repeats),
        },
    )
