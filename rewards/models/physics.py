"""`physics`: physical plausibility of images and clips.

Images [N, H, W, 3]: a VLM judge (rewards/models/vlm.py) answers a question set about physical
commonsense (support, gravity, reflections and shadows, object permanence); the score is the mean
P(Yes). Clips [N, T, H, W, 3]: temporal consistency, the frame-to-frame warping error after optical
flow (Lai et al., 2018, "Learning Blind Video Temporal Consistency"): for each pair of consecutive frames
the flow from t to t+1 is estimated, frame t+1 is warped back onto t, and the mean absolute RGB
difference over pixels that stay inside the frame is the error. consistency = exp(-error / err_scale),
1 for a perfectly coherent clip. With a VLM configured, the question set is also asked on `vlm_frames`
frames sampled evenly from each clip, and the score is
`temporal_weight · consistency + (1 - temporal_weight) · mean P(Yes)`.

The flow is coarse-to-fine Lucas-Kanade (pyramid of 2x average pools, a few warped refinements per level,
a box window, Tikhonov-regularised 2x2 solve), written in torch so it needs nothing beyond it. It is a
dense LK, not RAFT: it tracks smooth motion of a few pixels per level well and fails on large jumps and
on occlusions, and that failure is what a flickering or teleporting clip should pay. We do not mask
occlusions with a forward-backward check: with a weak flow, the check would mask exactly the
inconsistencies the score must see.

Example:
    scorer = make_scorer("physics")                                # clips only: temporal consistency
    scorer.score(clips_uint8_ntHW3, prompts).scores["physics"]     # float32 [N] in (0, 1]
    make_scorer("physics", weights="/ckpt/Qwen2.5-VL-7B-Instruct", backend="vllm")  # adds the VLM check
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rewards.base import ScoreBatch, ScorerInfo, register
from rewards.models._preprocess import check_batch

PHYSICS_QUESTIONS = {
    "support": "Is every object in this image resting on a surface or held, rather than floating unsupported?"
    " Answer Yes or No.",
    "gravity": "Do liquids, cloth, hair and loose objects in this image hang or fall the way gravity pulls"
    " them? Answer Yes or No.",
    "reflections": "Do the reflections and shadows in this image agree with the objects and the light?"
    " Answer Yes or No.",
    "permanence": "Is every object in this image whole and solid, with no parts vanishing, merging or passing"
    " through each other? Answer Yes or No.",
}


def warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `image` at x + flow(x): float [B, C, H, W], [B, 2, H, W] (dx, dy in pixels) ->
    warped float [B, C, H, W] and bool [B, 1, H, W], True where x + flow(x) lies inside the frame."""
    _, _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij"
    )
    x = xs.to(flow.device) + flow[:, 0]
    y = ys.to(flow.device) + flow[:, 1]
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)
    warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return warped, inside.unsqueeze(1)


def lucas_kanade(
    a: torch.Tensor, b: torch.Tensor, *, levels: int = 4, iters: int = 3, window: int = 9, reg: float = 1e-4
) -> torch.Tensor:
    """Dense flow with a(x) ≈ b(x + flow(x)): grey float [B, 1, H, W] x2 -> float [B, 2, H, W] in pixels."""
    grad = torch.tensor([-0.5, 0.0, 0.5], dtype=a.dtype, device=a.device)
    flow = None
    for level in reversed(range(levels)):
        scale = 2**level
        if min(a.shape[-2:]) // scale < window:  # too coarse to hold a window: skip this level
            continue
        al = F.avg_pool2d(a, scale) if scale > 1 else a
        bl = F.avg_pool2d(b, scale) if scale > 1 else b
        if flow is None:
            flow = torch.zeros(a.shape[0], 2, *al.shape[-2:], dtype=a.dtype, device=a.device)
        else:  # the coarser estimate, upsampled and rescaled to this level's pixels
            flow = 2 * F.interpolate(flow, size=al.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(iters):
            bw, _ = warp(bl, flow)
            mid = F.pad((al + bw) / 2, (1, 1, 1, 1), mode="replicate")
            ix = F.conv2d(mid[..., 1:-1, :], grad.view(1, 1, 1, 3))
            iy = F.conv2d(mid[..., :, 1:-1], grad.view(1, 1, 3, 1))
            it = bw - al
            prods = torch.cat([ix * ix, ix * iy, iy * iy, ix * it, iy * it], dim=1)
            sxx, sxy, syy, sxt, syt = F.avg_pool2d(
                prods, window, stride=1, padding=window // 2, count_include_pad=False
            ).unbind(1)
            sxx, syy = sxx + reg, syy + reg  # flat regions: no gradient, no update
            det = sxx * syy - sxy * sxy
            dx = -(syy * sxt - sxy * syt) / det
            dy = -(sxx * syt - sxy * sxt) / det
            flow = flow + torch.stack([dx, dy], dim=1).clamp(-2.0, 2.0)
    if flow is None:
        raise ValueError(
            f"physics: frames of {tuple(a.shape[-2:])} are smaller than the flow window {window}"
        )
    return flow


def warping_errors(clips: np.ndarray, *, size: int, levels: int = 4) -> np.ndarray:
    """uint8 [N, T, H, W, 3] -> float32 [N]: mean over consecutive pairs of the masked mean |warp(f_t+1) - f_t|
    in RGB units of [0, 1]; frames are first area-resized so the longer side is at most `size`."""
    n, t, h, w, _ = clips.shape
    frames = (
        torch.from_numpy(np.require(clips, requirements="W"))
        .reshape(n * t, h, w, 3)
        .permute(0, 3, 1, 2)
        .float()
        / 255.0
    )
    if max(h, w) > size:
        frames = F.interpolate(
            frames, size=(round(h * size / max(h, w)), round(w * size / max(h, w))), mode="area"
        )
    frames = frames.reshape(n, t, *frames.shape[1:])
    errors = np.empty(n, dtype=np.float32)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for i in range(n):
        first, second = frames[i, :-1], frames[i, 1:]  # [T-1, 3, h, w]
        flow = lucas_kanade((first * weights).sum(1, keepdim=True), (second * weights).sum(1, keepdim=True),
                            levels=levels)  # fmt: skip
        warped, inside = warp(second, flow)
        diff = (warped - first).abs().mean(1, keepdim=True)
        per_pair = (diff * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3))  # NaN when nothing stays inside
        errors[i] = per_pair.mean().item()
    return errors


@register("physics")
class Physics:
    """Physical plausibility; `weights` (optional) is a local VLM folder for the question set."""

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        questions: dict[str, str] | str | None = None,
        temporal_weight: float | str = 0.5,
        err_scale: float | str = 0.05,
        flow_size: int | str = 128,
        vlm_frames: int | str = 4,
        **judge_kwargs: Any,
    ) -> None:
        """`judge_kwargs` (device, backend, dtype, batch_size, engine_args, yes, no, system, ...) go to the
        VLM judge; see rewards/models/vlm.py."""
        self.temporal_weight = float(temporal_weight)
        self.err_scale = float(err_scale)
        self.flow_size = int(flow_size)
        self.vlm_frames = int(vlm_frames)
        if (
            not 0.0 <= self.temporal_weight <= 1.0
            or self.err_scale <= 0
            or self.flow_size < 16
            or self.vlm_frames < 1
        ):
            raise ValueError(
                "physics: need 0 <= temporal_weight <= 1, err_scale > 0, flow_size >= 16, vlm_frames >= 1"
            )
        self.judge = None
        if weights:
            from rewards.models.vlm import VLMJudge

            self.judge = VLMJudge(weights=weights, questions=questions or PHYSICS_QUESTIONS, name="physics",
                                  **judge_kwargs)  # fmt: skip
        elif questions or judge_kwargs.keys() - {"device"}:
            raise ValueError(
                f"physics: VLM options {sorted(judge_kwargs) or ['questions']} need weights=<VLM folder>"
            )

    def info(self) -> ScorerInfo:
        version = f"physics/lk-e{self.err_scale:g}" + (f"+{self.judge.version}" if self.judge else "")
        return ScorerInfo(
            name="physics", version=version, heads=["physics"], max_batch=16, accepts_video=True
        )

    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        check_batch("physics", images, prompts, video=True)
        video = images.ndim == 5
        if not video and self.judge is None:
            raise ValueError("physics: still images are judged by a VLM: pass weights=<VLM folder>")
        if video and images.shape[1] < 2:
            raise ValueError(f"physics: a clip needs at least 2 frames, got {images.shape[1]}")
        n = images.shape[0]
        extras: dict[str, np.ndarray] = {}
        reasons = [""] * n
        parts: list[tuple[float, np.ndarray]] = []
        if video:
            err = warping_errors(images, size=self.flow_size)
            consistency = np.exp(-err / self.err_scale).astype(np.float32)
            extras.update(warp_error=err, temporal_consistency=consistency)
            parts.append((self.temporal_weight if self.judge else 1.0, consistency))
        if self.judge is not None:
            k = min(self.vlm_frames, images.shape[1]) if video else 1
            picks = np.linspace(0, images.shape[1] - 1, k).round().astype(int) if video else None
            frames = images[:, picks].reshape(-1, *images.shape[-3:]) if video else images  # [N*k, H, W, 3]
            values, why = self.judge.ask(frames, [p for p in prompts for _ in range(k)])  # [N*k, Q]
            per_q = values.reshape(n, k, -1).mean(axis=1)  # NaN where any sampled frame failed
            extras.update({q: per_q[:, j] for j, q in enumerate(self.judge.questions)})
            reasons = [next((r for r in why[i * k : (i + 1) * k] if r), "") for i in range(n)]
            parts.append((1.0 - self.temporal_weight if video else 1.0, per_q.mean(axis=1)))
        score = sum(w * v for w, v in parts).astype(np.float32)  # type: ignore[union-attr]
        ok = np.array([not r for r in reasons]) & np.isfinite(score)
        reasons = [r or ("" if good else "no pixels stayed inside the frame after warping")
                   for r, good in zip(reasons, np.isfinite(score))]  # fmt: skip
        return ScoreBatch(scores={"physics": score}, extras=extras, ok=ok, errors=reasons)


def random_checkpoint(name: str, root: str | Path, *, native: bool = False, seed: int = 0) -> dict[str, Any]:
    """The physics scorer's VLM is any judge folder: the random LLaVA of `rewards.models.vlm`."""
    from rewards.models.vlm import random_checkpoint as vlm_checkpoint

    return vlm_checkpoint("vlm", root, native=native, seed=seed)
