"""What the neural scorers share: batch checks, CLIP-style pixel preprocessing, strict checkpoint loading.

The published reward models were trained on OpenAI-CLIP preprocessing (shortest side resized with
bicubic filtering, centre crop, CLIP mean/std). They differ in one detail we must keep to reproduce their
numbers: HPSv2 converts to a tensor *before* resizing (torchvision's antialiased tensor bicubic), while
ImageReward and the LAION aesthetic predictor resize the PIL image (PIL's bicubic). `clip_pixels` does
either, without torchvision (which cannot sit beside our torch build).

Example:
    check_batch("hpsv2", images, prompts)                       # uint8 [N, H, W, 3], N prompts
    pixels = clip_pixels(images, 224, resample="tensor")        # float32 [N, 3, 224, 224]
    load_strict(net, load_state_dict(existing(path, "hpsv2: weights")), "hpsv2")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_batch(name: str, images: np.ndarray, prompts: list[str], *, video: bool = False) -> None:
    """Raise ValueError unless `images` is uint8 [N, H, W, 3] (or [N, T, H, W, 3] when `video`) with N prompts."""
    ndims = (4, 5) if video else (4,)
    shape = "[N, H, W, 3] or [N, T, H, W, 3]" if video else "[N, H, W, 3]"
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(
            f"{name}: images must be a uint8 numpy array {shape}, got {type(images).__name__}"
            f" {getattr(images, 'dtype', '')}"
        )
    if images.ndim not in ndims or images.shape[-1] != 3:
        raise ValueError(f"{name}: images must be uint8 {shape}, got shape {images.shape}")
    if images.shape[0] == 0 or min(images.shape[1:-1]) == 0:
        raise ValueError(f"{name}: empty batch or empty image, shape {images.shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name}: {images.shape[0]} images but {len(prompts)} prompts")


def clip_pixels(
    images: np.ndarray,
    size: int,
    *,
    resample: Literal["pil", "tensor"],
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, size, size]: resize the shortest side, centre-crop, normalise.

    Sizes and crop offsets follow torchvision's `Resize(size)` + `CenterCrop(size)` exactly.
    "pil": `Resize` on the PIL image (PIL bicubic, what OpenAI CLIP / ImageReward / LAION do).
    "tensor": `ToTensor` first, then an antialiased bicubic resize of the float tensor (what HPSv2 does);
    values are not clamped, as in torchvision.
    """
    _, h, w, _ = images.shape
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    if resample == "pil":
        from PIL import Image

        resized = np.stack(
            [
                np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BICUBIC))
                if (new_h, new_w) != (h, w)
                else img
                for img in images
            ]
        )
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).float().div_(255.0)
    elif resample == "tensor":
        # Arrays decoded from the wire are read-only; torch wants a writable buffer (copied only then).
        x = torch.from_numpy(np.require(images, requirements="W")).permute(0, 3, 1, 2).float().div_(255.0)
        if (new_h, new_w) != (h, w):
            x = torch.nn.functional.interpolate(
                x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
            )
    else:
        raise ValueError(f"resample must be 'pil' or 'tensor', got {resample!r}")
    top = round((new_h - size) / 2.0)  # torchvision's CenterCrop offsets (round half to even)
    left = round((new_w - size) / 2.0)
    x = x[:, :, top : top + size, left : left + size]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def existing(path: str | Path | None, what: str) -> Path:
    """`path` as a Path, or a ValueError naming `what` when it is missing (weights are never downloaded)."""
    if path is None or str(path) == "":
        raise ValueError(f"{what}: a local path is required (weights are never downloaded)")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    return p


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> the torch dtype (recipes and the CLI pass strings)."""
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .pt / .pth / .bin file, unwrapped from {'state_dict': ...}, no 'module.'."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled code objects: refuse rather than execute them
            raise ValueError(f"{path}: not a plain tensor checkpoint ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    # Checkpoints saved from DistributedDataParallel carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    published_name: Callable[[str], str] = str,
) -> None:
    """Load `state` into `module`; any missing, unexpected or mis-shaped key is a ValueError naming it.

    The checkpoint's tensors are assigned, not copied, so `module` may be built on the meta device
    (no second copy of a billion random parameters); non-persistent buffers stay the caller's job.
    `published_name` maps our key names back to the checkpoint's for the error message.
    """
    own = module.state_dict()
    missing = sorted(map(published_name, set(own) - set(state)))
    unexpected = sorted(map(published_name, set(state) - set(own)))
    wrong = [
        f"{published_name(k)} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what}: checkpoint does not match the published layout: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, wrong shape {wrong[:5]}"
        )
    module.load_state_dict(state, strict=True, assign=True)
