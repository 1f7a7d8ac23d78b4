"""Fuzzing the reward service (issue 10): 1,000+ malformed or random messages, each answered with a
status, the server still serving afterwards and its memory flat."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sana_rl.reward.v1 import reward_pb2 as pb

from rewards.base import make_scorer
from rewards.wire import encode_request
from tests.integration.test_reward_service import serving

Code = grpc.StatusCode
SCORE = "/sana_rl.reward.v1.RewardService/Score"
STREAM = "/sana_rl.reward.v1.RewardService/ScoreStream"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _valid(rng: random.Random) -> bytes:
    # 1 in 8 above 1 MiB, which the server parses on its zero-copy path
    n, size = rng.randint(1, 3), rng.choice([4, 8, 8, 16, 16, 16, 24, 400])
    images = np.frombuffer(rng.randbytes(n * size * size * 3), np.uint8).reshape(n, size, size, 3)
    return encode_request(images, ["a red circle"] * n, request_id="fuzz").SerializeToString()


def _malformed(rng: random.Random, i: int) -> bytes:
    """One message of the i-th kind: a different way of being wrong each time."""
    kind = i % 9
    if kind == 0:  # random bytes, often 1.5 MB (so ~90 MB would show if requests were kept)
        return rng.randbytes(rng.choice([1, 100, 5000, 3 << 19, 3 << 19, 3 << 19]))
    if kind == 1:  # a valid message cut short
        raw = _valid(rng)
        return raw[: rng.randrange(1, len(raw))]
    if kind == 2:  # wrong byte counts
        msg = pb.ScoreRequest.FromString(_valid(rng))
        msg.images.data = (
            msg.images.data[: -rng.randint(1, 40)] if rng.random() < 0.5 else msg.images.data + b"x"
        )
        return msg.SerializeToString()
    if kind == 3:  # huge or overflowing shapes with little data
        dims = [rng.choice([2**31, 2**62, 2**63 - 1, -1, 10**12]) for _ in range(3)]
        return pb.ScoreRequest(
            images=pb.ImageBatch(data=b"\0" * 48, shape=[1, *dims], layout=1), prompts=["a"]
        ).SerializeToString()
    if kind == 4:  # zero-size batches and zero dimensions
        shape = rng.choice([[0, 4, 4, 3], [2, 0, 4, 3], [1, 4, 4, 0], [0, 1, 4, 4, 3]])
        return pb.ScoreRequest(images=pb.ImageBatch(shape=shape, layout=len(shape) - 3)).SerializeToString()
    if kind == 5:  # a prompt that is not UTF-8 (field 4, length-delimited)
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        return _valid(rng) + bytes([0x22, len(bad)]) + bad
    if kind == 6:  # unknown layout / wrong rank / wrong channels
        msg = pb.ScoreRequest.FromString(_valid(rng))
        choice = rng.randrange(3)
        if choice == 0:
            msg.images.layout = rng.choice([0, 3, 99, -5])
        elif choice == 1:
            msg.images.shape.append(1)
        else:
            msg.images.shape[-1] = rng.choice([1, 4])
        return msg.SerializeToString()
    if kind == 7:  # prompt and id counts that do not match
        msg = pb.ScoreRequest.FromString(_valid(rng))
        msg.prompts.append("extra") if rng.random() < 0.5 else msg.item_ids.extend(["a"] * 7)
        return msg.SerializeToString()
    raw = bytearray(_valid(rng))  # kind 8: random bit flips anywhere
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw)


async def _unary(channel: grpc.aio.Channel, raw: bytes) -> Code:
    try:
        await channel.unary_unary(SCORE)(raw, timeout=10)
        return Code.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def _truncated_stream(channel: grpc.aio.Channel, rng: random.Random) -> Code:
    """Send a few messages, valid or not, then abandon the stream mid-way (or half-close it)."""
    call = channel.stream_stream(STREAM)(timeout=10)
    try:
        for _ in range(rng.randint(0, 3)):
            await call.write(_valid(rng) if rng.random() < 0.5 else _malformed(rng, rng.randrange(9)))
        if rng.random() < 0.5:
            call.cancel()
            return Code.CANCELLED
        await call.done_writing()
        async for _ in call:
            pass
        return await call.code()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    except asyncio.InvalidStateError:  # the server ended the stream (bad message) while we wrote
        return await call.code()


def test_fuzzed_messages_get_a_status_and_the_server_stays_up_and_flat() -> None:
    rng = random.Random(1234)

    async def round_(channel: grpc.aio.Channel, start: int, count: int) -> Counter[Code]:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> Code:
            async with sem:
                if i % 10 == 9:
                    return await _truncated_stream(channel, rng)
                return await _unary(channel, _malformed(rng, i))

        return Counter(await asyncio.gather(*(one(i) for i in range(start, start + count))))

    async def main() -> None:
        async with serving(make_scorer("jpeg_compressibility"), max_wait_ms=1) as (running, stub):
            async with grpc.aio.insecure_channel(
                running.address, options=[("grpc.max_send_message_length", 64 << 20)]
            ) as channel:
                # Allocator and gRPC pools reach their steady size: measured here, RSS grew 20 MB over the
                # 1200 messages after a 300-message warm-up, then -4 to +12 MB per further 1200 (no trend).
                # Late in the full suite (an 850 MB process) one round once grew 27 MB, so a single round is
                # no leak test: a leak grows the process in every round, noise does not.
                warm = await round_(channel, 0, 1500)
                growth, codes = [], Counter[Code]()
                for k in range(3):
                    rss0 = _rss_mb()
                    codes += await round_(channel, 1500 + 1200 * k, 1200)
                    growth.append(_rss_mb() - rss0)
                # every message was answered: a status the protocol promises, never INTERNAL or UNKNOWN
                allowed = {Code.INVALID_ARGUMENT, Code.OK, Code.CANCELLED}
                assert set(codes) | set(warm) <= allowed, codes
                assert sum(codes.values()) == 3600 and codes[Code.INVALID_ARGUMENT] >= 2700, codes
                # >= 10 kB kept per message would grow every round by >= 12 MB
                assert min(growth) < 12 and sum(growth) < 60, f"RSS grew {growth} MB per 1200 fuzzed messages"
                health = health_pb2_grpc.HealthStub(channel)
                status = (await health.Check(health_pb2.HealthCheckRequest())).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                images = np.zeros((2, 8, 8, 3), np.uint8)
                resp = await stub.Score(encode_request(images, ["a", "b"]))
                assert all(it.ok for it in resp.items) and resp.heads[0].values[0] < 0
                assert running.core.accepting and running.core.stats.rejected_full == 0

    asyncio.run(main())
