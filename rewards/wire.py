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
from collections.abc import Iterator

import numpy as np
from google.protobuf.message import DecodeError
from sana_rl.reward.v1 import reward_pb2 as pb

from rewards.base import ScoreBatch, ScorerInfo
from rewards.core import MalformedRequest, ScoreInput

_RANK = {pb.LAYOUT_NHWC: 4, pb.LAYOUT_NTHWC: 5}
_ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}
_IMAGES_TAG = bytes([(2 << 3) | 2])  # ScoreRequest.images: field 2, length-delimited
_IMAGE_DATA_TAG = bytes([(1 << 3) | 2])  # ImageBatch.data: field 1, length-delimited
_UNPARSEABLE = "cannot parse a sana_rl.reward.v1.ScoreRequest"
_ZERO_COPY_BYTES = 1 << 20  # requests above this have their pixels viewed in place (_split_pixels)


def decode_request(raw: bytes, *, accepts_video: bool) -> ScoreInput:
    """Parse and validate a serialized ScoreRequest. Raises MalformedRequest."""
    pixels = None
    if len(raw) > _ZERO_COPY_BYTES:
        raw, pixels = _split_pixels(raw)
    try:
        msg = pb.ScoreRequest.FromString(raw)
    except DecodeError as exc:  # also what invalid UTF-8 in a prompt (a proto3 string) gives
        raise MalformedRequest(
            f"{_UNPARSEABLE} ({exc}): truncated or corrupt bytes, or a prompt that is not valid UTF-8"
        ) from None
    return request_to_input(msg, accepts_video=accepts_video, pixels=pixels)


def _split_pixels(raw: bytes) -> tuple[bytes, memoryview | None]:
    """The request without its ImageBatch.data, and a view of those bytes inside `raw`.

    Protobuf's parser copies a bytes field into its arena, and Python copies it again on reading it: for
    16 images at 512 px, two fresh 12.6 MB buffers whose page faults cost about a fifth of a fast
    scorer's time. Instead we walk the top-level fields and those of each `images` occurrence, hand the
    parser everything except `data`, and view the last `data` in place (the last occurrence of a
    singular field wins, as in protobuf). Small requests skip this: the walk costs more than the copy.
    """
    view = memoryview(raw)
    keep: list[bytes | memoryview] = []
    pixels = None
    for field, wire_type, start, body, end in _fields(raw, 0, len(raw)):
        if (field, wire_type) != (2, 2):
            keep.append(view[start:end])
            continue
        inner: list[bytes | memoryview] = []
        for f, w, s, b, e in _fields(raw, body, end):
            if (f, w) == (1, 2):
                pixels = view[b:e]
            else:
                inner.append(view[s:e])
        rest = b"".join(inner)
        keep += [_IMAGES_TAG, _varint(len(rest)), rest]
    return b"".join(keep), pixels


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start, body start, end) of each field in buf[pos:end]."""
    while pos < end:
        start = pos
        tag, pos = _read_varint(buf, pos)
        wire_type = tag & 7
        if wire_type == 0:
            body, (_, pos) = pos, _read_varint(buf, pos)
        elif wire_type == 2:
            length, body = _read_varint(buf, pos)
            pos = body + length
        elif wire_type in (1, 5):
            body, pos = pos, pos + (8 if wire_type == 1 else 4)
        else:
            raise MalformedRequest(f"{_UNPARSEABLE}: wire type {wire_type} at byte {start}")
        if pos > end:
            raise MalformedRequest(f"{_UNPARSEABLE}: truncated message")
        yield tag >> 3, wire_type, start, body, pos


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64 and pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise MalformedRequest(f"{_UNPARSEABLE}: truncated or overlong varint")


def request_to_input(
    msg: pb.ScoreRequest, *, accepts_video: bool, pixels: bytes | memoryview | None = None
) -> ScoreInput:
    """Validate a parsed ScoreRequest and view its pixels (`msg.images.data`, or `pixels` when
    decode_request took them out) as an array. Raises MalformedRequest."""
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
    data = img.data if pixels is None else pixels  # each read of a bytes field copies it: read it once
    _check_bytes(rid + "images", len(data), n, math.prod(shape[1:]))
    if len(msg.prompts) != n:
        what = f"item {len(msg.prompts)} has no prompt" if len(msg.prompts) < n else "more prompts than items"
        raise MalformedRequest(f"{rid}prompts: {len(msg.prompts)} prompts for {n} items ({what})")
    if msg.item_ids and len(msg.item_ids) != n:
        raise MalformedRequest(
            f"{rid}item_ids: {len(msg.item_ids)} ids for {n} items (send none or one per item)"
        )
    latents = _decode_latents(msg.latents, n, rid) if msg.HasField("latents") else None
    return ScoreInput(
        images=np.frombuffer(data, dtype=np.uint8).reshape(shape),
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
    data = t.data
    _check_bytes(rid + "latents", len(data), n, math.prod(shape[1:]) * _ITEMSIZE[t.dtype])
    if t.dtype == pb.DTYPE_BFLOAT16:
        wide = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    dtype = "<f4" if t.dtype == pb.DTYPE_FLOAT32 else "<f2"
    return np.frombuffer(data, dtype=dtype).astype(np.float32).reshape(shape)


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
    msg = pb.ScoreRequest(request_id=request_id, prompts=prompts, item_ids=item_ids or [])
    # Fill the image field in place: building an ImageBatch first and nesting it copies the pixels again.
    msg.images.data = np.ascontiguousarray(images).tobytes()
    msg.images.shape.extend(images.shape)
    msg.images.layout = pb.LAYOUT_NHWC if images.ndim == 4 else pb.LAYOUT_NTHWC
    if latents is not None:
        lat = np.ascontiguousarray(latents, dtype="<f4")
        msg.latents.CopyFrom(pb.Tensor(data=lat.tobytes(), dtype=pb.DTYPE_FLOAT32, shape=lat.shape))
    return msg


def encode_request_bytes(
    images: np.ndarray,
    prompts: list[str],
    *,
    item_ids: list[str] | None = None,
    latents: np.ndarray | None = None,
) -> bytes:
    """The serialized ScoreRequest of encode_request, built with a single copy of the pixels.

    Going through the message object copies 12.6 MB three times for 16 images at 512 px (tobytes, into
    the message, out again when serializing), a third of the scoring time of a fast scorer. Here the
    message is serialized without its pixels and the pixels follow as a second occurrence of `images`
    holding only `data`: the protobuf wire format merges repeated occurrences of an embedded message
    field, so every parser reads exactly the message encode_request builds (a test checks it).
    """
    head = encode_request(images[:, :0], prompts, item_ids=item_ids, latents=latents)
    head.images.ClearField("shape")
    head.images.shape.extend(images.shape)
    pixels = np.ascontiguousarray(images).reshape(-1).data  # a view: the join below is the one copy
    inner = _IMAGE_DATA_TAG + _varint(len(pixels))
    outer = _IMAGES_TAG + _varint(len(inner) + len(pixels))
    return b"".join([head.SerializeToString(), outer, inner, pixels])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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
        reads_latents=info.reads_latents,
    )


def decode_info(msg: pb.DescribeResponse) -> ScorerInfo:
    return ScorerInfo(
        name=msg.name,
        version=msg.version,
        heads=list(msg.heads),
        input_size=msg.input_size or None,
        max_batch=msg.max_batch,
        accepts_video=msg.accepts_video,
        reads_latents=msg.reads_latents,
    )
