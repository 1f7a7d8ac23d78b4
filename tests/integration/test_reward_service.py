"""The reward service over real sockets (in-process grpc.aio server on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sana_rl.reward.v1 import reward_pb2 as pb
from sana_rl.reward.v1 import reward_pb2_grpc as pb_grpc

from rewards.base import RewardModel, make_scorer
from rewards.server import RunningServer, ServerConfig, start_server
from rewards.servicer import SERVICE_NAME
from rewards.wire import encode_request
from tests.unit.test_reward_core import MeanModel

Code = grpc.StatusCode


@contextlib.asynccontextmanager
async def serving(
    model: RewardModel, **cfg: object
) -> AsyncIterator[tuple[RunningServer, pb_grpc.RewardServiceStub]]:
    """A server on a free loopback port and a stub connected to it."""
    running = await start_server(model, ServerConfig(port=0, **cfg))  # type: ignore[arg-type]
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield running, pb_grpc.RewardServiceStub(channel)
    finally:
        await running.stop(0.5)


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


async def _code(call: object) -> Code:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


def test_jpeg_round_trip_equals_in_process_scoring_and_describe() -> None:
    async def main() -> None:
        for name in ("jpeg_compressibility", "jpeg_incompressibility"):
            scorer = make_scorer(name)
            images = _images(5)
            async with serving(make_scorer(name)) as (_, stub):
                d = await stub.Describe(pb.DescribeRequest())
                assert (d.name, d.version, list(d.heads)) == (name, "ddpo-q95", [name])
                assert d.max_batch == 32 and d.accepts_video and d.max_request_bytes == 64 << 20
                ids = [f"item{i}" for i in range(5)]
                resp = await stub.Score(encode_request(images, ["a"] * 5, item_ids=ids, request_id="r1"))
            assert resp.request_id == "r1" and resp.scorer == name and resp.scorer_version == "ddpo-q95"
            assert [it.item_id for it in resp.items] == ids and all(it.ok for it in resp.items)
            expected = scorer.score(images, ["a"] * 5).scores[name]
            np.testing.assert_allclose(resp.heads[0].values, expected, rtol=1e-6)

    asyncio.run(main())


def test_composition_round_trip() -> None:
    shapes = pytest.importorskip("orchestrator.shapes_world")
    scenes = shapes.generate(6, seed=3, size=64)
    images = np.stack([s.render(64) for s in scenes])
    prompts = [s.caption() for s in scenes]
    expected = make_scorer("composition").score(images, prompts)

    async def main() -> pb.ScoreResponse:
        async with serving(make_scorer("composition")) as (_, stub):
            return await stub.Score(encode_request(images, prompts))

    resp = asyncio.run(main())
    np.testing.assert_allclose(resp.heads[0].values, expected.scores["composition"], rtol=1e-6)
    assert {e.name for e in resp.extras} == set(expected.extras) and all(it.ok for it in resp.items)


def test_streaming_answers_every_request_by_id() -> None:
    async def main() -> None:
        async with serving(MeanModel(), max_wait_ms=20) as (running, stub):
            call = stub.ScoreStream()
            for i in range(6):
                await call.write(
                    encode_request(np.full((2, 4, 4, 3), 10 * i, np.uint8), ["p", "p"], request_id=f"s{i}")
                )
            await call.done_writing()
            got = {m.request_id: list(m.heads[0].values) async for m in call}
            assert await call.code() == Code.OK
            assert got == {f"s{i}": pytest.approx([10 * i / 255] * 2) for i in range(6)}
            assert running.core.stats.coalesced >= 1  # stream requests are batched together too
            # a malformed request ends the stream with its status
            call = stub.ScoreStream()
            await call.write(encode_request(_images(1), ["p"], request_id="good"))
            await call.write(pb.ScoreRequest(request_id="bad"))
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert (
                err.value.code() == Code.INVALID_ARGUMENT
                and "request 'bad': images: missing" in err.value.details()
            )

    asyncio.run(main())


def test_health_reflection_and_graceful_shutdown() -> None:
    async def main() -> None:
        model = MeanModel(delay=0.4)
        running = await start_server(model, ServerConfig(port=0, grace_s=3.0))
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub, health = pb_grpc.RewardServiceStub(channel), health_pb2_grpc.HealthStub(channel)
            for service in (SERVICE_NAME, ""):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name async for a in answers for s in a.list_services_response.service}
            assert names == {
                SERVICE_NAME,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            answers = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)])
            )
            files = [a.file_descriptor_response async for a in answers]
            assert files and files[0].file_descriptor_proto  # clients can build stubs without our files

            in_flight = asyncio.ensure_future(stub.Score(encode_request(_images(1), ["p"])))
            await asyncio.sleep(0.1)
            stopping = asyncio.ensure_future(running.stop())
            await asyncio.sleep(0.05)
            resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await _code(stub.Score(encode_request(_images(1), ["p"]))) == Code.UNAVAILABLE
            assert (await in_flight).items[0].ok  # drained, not dropped
            await stopping

    asyncio.run(main())


def test_batching_under_concurrent_clients() -> None:
    async def main() -> None:
        model = MeanModel(delay=0.02)
        async with serving(model, max_batch=64, max_wait_ms=30) as (running, _):
            channels = [grpc.aio.insecure_channel(running.address) for _ in range(8)]
            stubs = [pb_grpc.RewardServiceStub(c) for c in channels]
            reqs = [encode_request(np.full((3, 8, 8, 3), 20 * i, np.uint8), ["p"] * 3) for i in range(8)]
            for _ in range(3):
                answers = await asyncio.gather(*(s.Score(r) for s, r in zip(stubs, reqs)))
                for i, resp in enumerate(answers):  # every client gets its own items back
                    assert list(resp.heads[0].values) == pytest.approx([20 * i / 255] * 3)
            await asyncio.gather(*(c.close() for c in channels))
            stats = running.core.stats
            assert stats.coalesced >= 1 and stats.largest > 3, stats
            assert stats.items == 72 and stats.batches < 24

    asyncio.run(main())


def _batch(
    nbytes: int, shape: list[int], layout: int = 1, prompts: tuple[str, ...] = ("a",)
) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        images=pb.ImageBatch(data=b"\0" * nbytes, shape=shape, layout=layout), prompts=prompts
    )


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        (lambda: encode_request(_images(2), ["a"]), "1 prompts for 2 items (item 1 has no prompt)"),
        (lambda: _batch(0, [0, 4, 4, 3], prompts=()), "empty batch"),
        (lambda: _batch(47, [1, 4, 4, 3]), "item 0 is truncated"),
        (lambda: _batch(48, [1, 4, 4, 3], layout=9), "unknown layout 9"),
    ],
)
def test_malformed_requests_are_invalid_argument(request_, details: str) -> None:
    async def main() -> None:
        async with serving(make_scorer("jpeg_compressibility")) as (_, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Score(request_())
            assert err.value.code() == Code.INVALID_ARGUMENT and details in err.value.details()

    asyncio.run(main())


def test_nan_item_fails_alone() -> None:
    async def main() -> None:
        async with serving(MeanModel()) as (_, stub):
            resp = await stub.Score(encode_request(_images(3), ["a", "nan", "c"]))
        assert [it.ok for it in resp.items] == [True, False, True] and resp.items[
            1
        ].error == "non-finite score"
        assert np.isnan(resp.heads[0].values[1]) and np.isfinite(resp.heads[0].values[0])

    asyncio.run(main())


def test_token_required_and_compared(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    os.chmod(token, 0o600)
    with pytest.raises(ValueError, match="requires a bearer token"):
        ServerConfig(host="0.0.0.0").validate()  # never bound: off-loopback needs a token
    ServerConfig(host="0.0.0.0", token_file=str(token)).validate()

    async def main() -> None:
        async with serving(make_scorer("jpeg_compressibility"), token_file=str(token)) as (running, stub):
            req = encode_request(_images(1), ["p"])
            assert await _code(stub.Score(req)) == Code.UNAUTHENTICATED
            assert await _code(stub.Describe(pb.DescribeRequest())) == Code.UNAUTHENTICATED
            wrong = (("authorization", "Bearer s3cret-tokem"),)
            assert await _code(stub.Score(req, metadata=wrong)) == Code.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret-token"),)
            assert await _code(stub.Score(req, metadata=good)) == Code.OK
            stream = stub.ScoreStream(metadata=wrong)
            await stream.done_writing()
            assert await stream.code() == Code.UNAUTHENTICATED
            async with grpc.aio.insecure_channel(running.address) as channel:  # probes need no secret
                resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert resp.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


def test_queue_full_is_resource_exhausted_and_deadlines_are_honoured() -> None:
    async def main() -> None:
        model = MeanModel(delay=0.3)
        async with serving(model, max_batch=1, queue_size=2, max_wait_ms=0) as (running, stub):
            calls = [stub.Score(encode_request(_images(1, seed=i), ["p"])) for i in range(8)]
            codes = await asyncio.gather(*(_code(c) for c in calls))
            assert codes.count(Code.RESOURCE_EXHAUSTED) >= 3 and codes.count(Code.OK) >= 2, codes
            assert set(codes) == {Code.OK, Code.RESOURCE_EXHAUSTED}
            batches = running.core.stats.batches
            code = await _code(stub.Score(encode_request(_images(1), ["p"]), timeout=0.1))
            assert code == Code.DEADLINE_EXCEEDED
            await asyncio.sleep(0.35)
            assert running.core.stats.batches - batches <= 1  # the expired call was not scored twice over

    asyncio.run(main())


def test_message_limits_are_deliberate() -> None:
    images = _images(16, size=512)  # 12.6 MB: over gRPC's 4 MB default

    async def main() -> None:
        async with serving(make_scorer("jpeg_compressibility"), max_wait_ms=0) as (_, stub):
            resp = await stub.Score(encode_request(images, ["p"] * 16))
            assert len(resp.items) == 16 and all(it.ok for it in resp.items)
        async with serving(make_scorer("jpeg_compressibility"), max_message_mb=8) as (_, stub):
            assert await _code(stub.Score(encode_request(images, ["p"] * 16))) == Code.RESOURCE_EXHAUSTED

    asyncio.run(main())


def test_a_port_in_use_is_an_error_not_shared() -> None:
    async def main() -> None:
        async with serving(MeanModel()) as (running, _):
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{running.port}"):
                await start_server(MeanModel(), ServerConfig(port=running.port))

    asyncio.run(main())
