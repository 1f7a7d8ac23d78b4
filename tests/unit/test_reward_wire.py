"""The wire conversion: every malformed request is refused naming the problem (and the item), before any
array is allocated; well-formed ones round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sana_rl.reward.v1 import reward_pb2 as pb

from rewards.base import ScoreBatch, ScorerInfo
from rewards.core import MalformedRequest
from rewards.wire import (
    decode_request,
    decode_response,
    encode_request,
    encode_request_bytes,
    encode_response,
)


def _images(n: int = 3, size: int = 8) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _decode(msg: pb.ScoreRequest, video: bool = True):
    return decode_request(msg.SerializeToString(), accepts_video=video)


def test_round_trip_keeps_pixels_prompts_ids_and_latents() -> None:
    images = _images()
    latents = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float32)
    msg = encode_request(images, ["a", "é", ""], item_ids=["x", "y", "z"], latents=latents, request_id="r")
    inp = _decode(msg)
    np.testing.assert_array_equal(inp.images, images)
    assert inp.prompts == ["a", "é", ""] and inp.item_ids == ["x", "y", "z"] and inp.request_id == "r"
    np.testing.assert_array_equal(inp.latents, latents)
    assert _decode(encode_request(images, ["a"] * 3)).item_ids == ["0", "1", "2"]


def test_video_clips_and_bfloat16_latents() -> None:
    clips = np.random.default_rng(1).integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
    msg = encode_request(clips, ["a", "b"])
    assert msg.images.layout == pb.LAYOUT_NTHWC
    np.testing.assert_array_equal(_decode(msg).images, clips)
    with pytest.raises(MalformedRequest, match="does not accept video"):
        _decode(msg, video=False)
    values = np.array([[1.5, -2.0], [0.15625, 3.0]], dtype=np.float32)  # exact in bfloat16
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    msg = encode_request(_images(2), ["a", "b"])
    msg.latents.CopyFrom(pb.Tensor(data=bf16, dtype=pb.DTYPE_BFLOAT16, shape=[2, 2]))
    np.testing.assert_array_equal(_decode(msg).latents, values)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m.images.ClearField("data"), r"images\.data: 0 bytes .* item 0 is truncated"),
        (lambda m: setattr(m.images, "data", m.images.data[:-5]), r"item 2 is truncated"),
        (lambda m: setattr(m.images, "data", m.images.data + b"xy"), r"2 extra bytes"),
        (lambda m: m.images.shape.__setitem__(0, 0), r"empty batch"),
        (lambda m: m.images.shape.__setitem__(1, -8), r"every dimension must be > 0"),
        (lambda m: m.images.shape.__setitem__(3, 4), r"last dimension must be 3"),
        (lambda m: setattr(m.images, "layout", 7), r"unknown layout 7"),
        (lambda m: setattr(m.images, "layout", pb.LAYOUT_UNSPECIFIED), r"unknown layout 0"),
        (lambda m: setattr(m.images, "layout", pb.LAYOUT_NTHWC), r"has 4 dimensions, LAYOUT_NTHWC needs 5"),
        (lambda m: m.prompts.pop(), r"2 prompts for 3 items \(item 2 has no prompt\)"),
        (lambda m: m.prompts.append("x"), r"4 prompts for 3 items"),
        (lambda m: m.item_ids.extend(["a"]), r"item_ids: 1 ids for 3 items"),
        (lambda m: m.ClearField("images"), r"images: missing"),
        (lambda m: m.images.shape.extend([2**62]), r"has 5 dimensions"),
        (lambda m: m.images.shape.__setitem__(1, 2**62), r"bytes but the shape needs"),
        (lambda m: m.latents.CopyFrom(pb.Tensor(data=b"\0" * 8, dtype=9, shape=[3])), r"latents\.dtype"),
        (
            lambda m: m.latents.CopyFrom(pb.Tensor(data=b"\0" * 8, dtype=1, shape=[2])),
            r"must start with N = 3",
        ),
        (
            lambda m: m.latents.CopyFrom(pb.Tensor(data=b"\0" * 8, dtype=1, shape=[3])),
            r"latents\.data: 8 bytes",
        ),
    ],
)
def test_malformed_requests_name_the_problem(mutate, expected: str) -> None:
    msg = encode_request(_images(), ["a", "b", "c"], request_id="req-7")
    mutate(msg)
    with pytest.raises(MalformedRequest, match=expected) as err:
        _decode(msg)
    assert "request 'req-7'" in str(err.value)


def test_unparseable_bytes_and_invalid_utf8_prompt() -> None:
    raw = encode_request(_images(1), ["ok"]).SerializeToString()
    with pytest.raises(MalformedRequest, match="cannot parse"):
        decode_request(raw[: len(raw) // 2], accepts_video=True)
    bad_prompt = bytes([0x22, 2, 0xFF, 0xFE])  # field 4 (prompts), length 2, not UTF-8
    with pytest.raises(MalformedRequest, match="not valid UTF-8"):
        decode_request(raw + bad_prompt, accepts_video=True)


def test_response_round_trip_keeps_failures() -> None:
    inp = _decode(encode_request(_images(), ["a", "b", "c"], item_ids=["p", "q", "r"], request_id="r9"))
    batch = ScoreBatch(
        scores={"main": np.array([1.0, np.nan, 3.0], np.float32)},
        extras={"sub": np.array([0.1, 0.2, 0.3], np.float32)},
    )
    info = ScorerInfo(name="s", version="v2", heads=["main"])
    msg = encode_response(batch, info, inp)
    assert [it.item_id for it in msg.items] == ["p", "q", "r"] and msg.scorer_version == "v2"
    assert [it.ok for it in msg.items] == [True, False, True]
    assert msg.items[1].error == "non-finite score"
    back = decode_response(pb.ScoreResponse.FromString(msg.SerializeToString()), 3)
    np.testing.assert_array_equal(back.ok, [True, False, True])
    np.testing.assert_allclose(back.scores["main"][[0, 2]], [1.0, 3.0])
    np.testing.assert_allclose(back.extras["sub"], [0.1, 0.2, 0.3], rtol=1e-6)
    with pytest.raises(ValueError, match="malformed response"):
        decode_response(msg, 4)


def _root(a: np.ndarray) -> object:
    while isinstance(a, np.ndarray):
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def test_big_requests_view_their_pixels_in_place_and_parse_like_protobuf() -> None:
    images = np.random.default_rng(2).integers(0, 256, (3, 400, 400, 3), dtype=np.uint8)  # 1.4 MB
    ids = ["a", "b", "c"]
    canonical = encode_request(images, ["x", "ÿ", ""], item_ids=ids, request_id="big").SerializeToString()
    compact = encode_request_bytes(images, ["x", "ÿ", ""], item_ids=ids)
    assert pb.ScoreRequest.FromString(compact) == encode_request(images, ["x", "ÿ", ""], item_ids=ids)
    for raw in (canonical, compact):
        inp = decode_request(raw, accepts_video=False)
        np.testing.assert_array_equal(inp.images, images)
        assert inp.prompts == ["x", "ÿ", ""] and inp.item_ids == ids
        assert _root(inp.images) is raw  # no copy of the pixels
    # latents travel in the same compact request (for scorers that read them)
    lat = np.random.default_rng(3).standard_normal((3, 4, 2, 2)).astype(np.float32)
    with_lat = encode_request_bytes(images, ["x", "ÿ", ""], item_ids=ids, latents=lat)
    assert pb.ScoreRequest.FromString(with_lat) == encode_request(
        images, ["x", "ÿ", ""], item_ids=ids, latents=lat
    )
    np.testing.assert_array_equal(decode_request(with_lat, accepts_video=False).latents, lat)
    # a later `images` occurrence merges into the first and its `data` wins, as protobuf has it
    other = np.zeros_like(images)
    twice = canonical + encode_request_bytes(other, [])[-(other.nbytes + 8) :]
    np.testing.assert_array_equal(decode_request(twice, accepts_video=False).images, other)
    assert pb.ScoreRequest.FromString(twice).images.data == other.tobytes()


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (lambda raw: raw[:-10], "truncated message"),
        (lambda raw: raw + b"\x0b", "wire type 3"),
        (lambda raw: raw + b"\x80" * 11, "overlong varint"),
        (lambda raw: raw + bytes([0x22, 1, 0xFF]), "not valid UTF-8"),
        (lambda raw: raw + bytes([0x12, 3, 0x0A, 5, 0]), "truncated message"),  # images.data cut short
    ],
)
def test_big_malformed_requests_are_refused(cut, expected: str) -> None:
    raw = encode_request_bytes(np.zeros((2, 512, 512, 3), np.uint8), ["a", "b"])
    with pytest.raises(MalformedRequest, match=expected):
        decode_request(cut(raw), accepts_video=False)
