"""Conversion between the protocol's messages (sana_rl.reward.v1) and the data plane's types.

Decoding is where a malformed request is caught: every check raises `MalformedRequest` naming the field
and, where there is one, the item, before any array is allocated (a request claiming a huge shape costs
nothing). Pixels are viewed in place, not copied. The server and the client share this module, so both
sides agree on one encoding.

Example:
    msg = encode_request(images, prompts, request_id="r1")        # client
    inp = decode_request(msg.SerializeToString(), accepts_video=False)  # server
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError
from sana_rl.reward.v1 import reward_pb2 as pb

from rewards.base import ScoreBatch, ScorerInfo
from rewards.core import MalformedRequest, ScoreInput

_RANK = {pb.LAYOUT_NHWC: 4, pb.LAYOUT_NTHWC: 5}
_ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}


def decode_request(raw: bytes, *, accepts_video: bool) -> ScoreInput:
    """Parse and validate a serialized ScoreRequest. Raises MalformedRequest."""
    try:
        msg = pb.ScoreRequest.FromString(raw)
    except DecodeError as exc:  # also what invalid UTF-8 in a prompt (a proto3 string) gives
        raise MalformedRequest(
            f"cannot parse a sana_rl.reward.v1.ScoreRequest ({exc}): truncated or corrupt bytes, or a prompt "
            "that is not valid UTF-8"
        ) from None
    return request_to_input(msg, accepts_video=accepts_video)


def request_to_input(msg: pb.ScoreRequest, *, accepts_video: bool) -> ScoreInput:
    """Validate a parsed ScoreRequest and view its pixels as an array. Raises MalformedRequest."""
    rid = f"request {msg.request_id!r}: " if msg.request_id else ""
    if not msg.HasField("images"):
        raise MalformedRequest(f"{rid}images: missing")
    img = msg.images
    if img.layout not in _RANK:
        raise MalformedRequest(
            f"{rid}images.layout: unknown layout {img.layout} (use LAYOUT_NHWC or LAYOUT_NTHWC)"
        )
    if img.layout == pb.LAYOUT_NTHWC and not accepts_video:
        raise MalformedRequest(f"{rid}images.layout: this scorer does not accept video (LAYOUT_NTHWC)")
    shape = tuple(img.shape)
    if len(shape) != _RANK[img.layout]:
        raise MalformedRequest(
            f"{rid}images.shape: {list(shape)} has {len(shape)} dimensions, "
            f"{pb.Layout.Name(img.layout)} needs "
            f"{_RANK[img.layout]}"
        )
    if shape[0] == 0:
        raise MalformedRequest(f"{rid}images: empty batch (N = 0)")
    if any(d <= 0 for d in shape):
        raise MalformedRequest(f"{rid}images.shape: every dimension must be > 0, got {list(shape)}")
    if shape[-1] != 3:
        raise MalformedRequest(f"{rid}images.shape: last dimension must be 3 (RGB), got {list(shape)}")
    n = shape[0]
    _check_bytes(rid + "images", len(img.data), n, math.prod(shape[1:]))
    if len(msg.prompts) != n:
        what = f"item {len(msg.prompts)} has no prompt" if len(msg.prompts) < n else "more prompts than items"
        raise MalformedRequest(f"{rid}prompts: {len(msg.prompts)} prompts for {n} items ({what})")
    if msg.item_ids and len(msg.item_ids) != n:
        raise MalformedRequest(
            f"{rid}item_ids: {len(msg.item_ids)} ids for {n} items (send none or one per item)"
        )
    latents = _decode_latents(msg.latents, n, rid) if msg.HasField("latents") else None
    return ScoreInput(
        images=np.frombuffer(img.data, dtype=np.uint8).reshape(shape),
        prompts=list(msg.prompts),
        item_ids=list(msg.item_ids) or [str(i) for i in range(n)],
        latents=latents,
        request_id=msg.request_id,
    )


def _check_bytes(field: str, got: int, n: int, per_item: int) -> None:
    """len(data) must be n * per_item; otherwise name the first item the bytes do not cover."""
    want = n * per_item
    if got < want:
        raise MalformedRequest(
            f"{field}.data: {got} bytes but the shape needs {want} ({per_item} per item): "
            f"item {got // per_item} "
            "is truncated"
        )
    if got > want:
        raise MalformedRequest(
            f"{field}.data: {got} bytes but the shape needs {want}: {got - want} extra bytes"
        )


def _decode_latents(t: pb.Tensor, n: int, rid: str) -> np.ndarray:
    """float32 [N, ...] from a Tensor message (bfloat16 widened exactly)."""
    if t.dtype not in _ITEMSIZE:
        raise MalformedRequest(f"{rid}latents.dtype: unknown dtype {t.dtype}")
    shape = tuple(t.shape)
    if not shape or shape[0] != n:
        raise MalformedRequest(f"{rid}latents.shape: {list(shape)} must start with N = {n}")
    if any(d <= 0 for d in shape):
        raise MalformedRequest(f"{rid}latents.shape: every dimension must be > 0, got {list(shape)}")
    _check_bytes(rid + "latents", len(t.data), n, math.prod(shape[1:]) * _ITEMSIZE[t.dtype])
    if t.dtype == pb.DTYPE_BFLOAT16:
        wide = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    dtype = "<f4" if t.dtype == pb.DTYPE_FLOAT32 else "<f2"
    return np.frombuffer(t.data, dtype=dtype).astype(np.float32).reshape(shape)


def encode_request(
    images: np.ndarray,
    prompts: list[str],
    *,
    item_ids: list[str] | None = None,
    latents: np.ndarray | None = None,
    request_id: str = "",
) -> pb.ScoreRequest:
    """A ScoreRequest for uint8 [N, H, W, 3] images or [N, T, H, W, 3] clips; latents go as float32."""
    if images.dtype != np.uint8 or images.ndim not in (4, 5):
        raise ValueError(
            f"images: expected uint8 [N, H, W, 3] or [N, T, H, W, 3], got {images.dtype} {images.shape}"
        )
    msg = pb.ScoreRequest(
        request_id=request_id,
        images=pb.ImageBatch(
            data=np.ascontiguousarray(images).tobytes(),
            shape=images.shape,
            layout=pb.LAYOUT_NHWC if images.ndim == 4 else pb.LAYOUT_NTHWC,
        ),
        prompts=prompts,
        item_ids=item_ids or [],
    )
    if latents is not None:
        lat = np.ascontiguousarray(latents, dtype="<f4")
        msg.latents.CopyFrom(pb.Tensor(data=lat.tobytes(), dtype=pb.DTYPE_FLOAT32, shape=lat.shape))
    return msg


def encode_response(batch: ScoreBatch, info: ScorerInfo, inp: ScoreInput) -> pb.ScoreResponse:
    """The ScoreResponse for a request's scores (heads in the scorer's order, then any others)."""
    heads = list(info.heads) + [h for h in batch.scores if h not in info.heads]
    return pb.ScoreResponse(
        request_id=inp.request_id,
        scorer=info.name,
        scorer_version=info.version,
        heads=[pb.Scores(name=h, values=batch.scores[h].tolist()) for h in heads],
        extras=[pb.Scores(name=k, values=v.tolist()) for k, v in batch.extras.items()],
        items=[
            pb.ItemStatus(item_id=i, ok=bool(ok), error=err)
            for i, ok, err in zip(inp.item_ids, batch.ok, batch.errors, strict=True)
        ],
    )


def decode_response(msg: pb.ScoreResponse, n: int) -> ScoreBatch:
    """A ScoreBatch from a ScoreResponse for n items; a response of the wrong size is a protocol error."""
    scores = {s.name: np.asarray(s.values, dtype=np.float32) for s in msg.heads}
    extras = {s.name: np.asarray(s.values, dtype=np.float32) for s in msg.extras}
    bad = [k for k, v in [*scores.items(), *extras.items()] if v.shape != (n,)]
    if bad or len(msg.items) != n or not scores:
        raise ValueError(
            f"{msg.scorer}: malformed response for {n} items ({len(msg.items)} statuses, wrong length: {bad})"
        )
    return ScoreBatch(
        scores=scores,
        extras=extras,
        ok=np.array([it.ok for it in msg.items], dtype=bool),
        errors=["" if it.ok else it.error or "failed (no reason given)" for it in msg.items],
    )


def encode_info(info: ScorerInfo, max_request_bytes: int) -> pb.DescribeResponse:
    return pb.DescribeResponse(
        name=info.name,
        version=info.version,
        heads=info.heads,
        input_size=info.input_size or 0,
        max_batch=info.max_batch,
        accepts_video=info.accepts_video,
        max_request_bytes=max_request_bytes,
    )


def decode_info(msg: pb.DescribeResponse) -> ScorerInfo:
    return ScorerInfo(
        name=msg.name,
        version=msg.version,
        heads=list(msg.heads),
        input_size=msg.input_size or None,
        max_batch=msg.max_batch,
        accepts_video=msg.accepts_video,
    )
