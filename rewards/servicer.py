"""The RewardService endpoints: convert wire messages (rewards/wire.py), call the data plane
(rewards/core.py), convert back. Errors are raised as plain exceptions; StatusInterceptor maps them.

Requests arrive as raw bytes and are parsed here rather than by gRPC, so an unparseable message (a
truncated one, invalid UTF-8 in a prompt) is answered INVALID_ARGUMENT like any other malformed request,
instead of gRPC's generic INTERNAL for a failed deserializer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from sana_rl.reward.v1 import reward_pb2 as pb

from rewards import wire
from rewards.core import ScoringCore

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServicer:
    """Score, ScoreStream and Describe over one ScoringCore."""

    def __init__(self, core: ScoringCore, *, max_request_bytes: int) -> None:
        self.core = core
        self.max_request_bytes = max_request_bytes

    async def Score(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        inp = wire.decode_request(raw, accepts_video=self.core.info.accepts_video)
        batch = await self.core.score(inp, timeout=context.time_remaining())
        return wire.encode_response(batch, self.core.info, inp)

    async def ScoreStream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        # Requests are scored concurrently as they arrive (so the batcher can coalesce them) and answered
        # as they finish. At most queue_size are in flight per stream: past that we stop reading, and
        # HTTP/2 flow control pushes back on the sender instead of an error.
        results: asyncio.Queue[pb.ScoreResponse | Exception | None] = asyncio.Queue()
        window = asyncio.Semaphore(self.core.queue_size)
        tasks: set[asyncio.Task[None]] = set()

        async def one(raw: bytes) -> None:
            try:
                results.put_nowait(await self.Score(raw, context))
            except Exception as exc:
                results.put_nowait(exc)
            finally:
                window.release()

        async def read() -> None:
            try:
                async for raw in requests:
                    await window.acquire()
                    task = asyncio.create_task(one(raw))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
                results.put_nowait(None)
            except Exception as exc:
                results.put_nowait(exc)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                if isinstance(item, Exception):
                    raise item  # the first failure ends the stream with its status
                yield item
        finally:  # the stream ended, failed or was cancelled by the client: stop all its work
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeResponse:
        return wire.encode_info(self.core.info, self.max_request_bytes)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a grpc.aio server."""
        out = pb.ScoreResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Score": grpc.unary_unary_rpc_method_handler(self.Score, None, out),
                "ScoreStream": grpc.stream_stream_rpc_method_handler(self.ScoreStream, None, out),
                "Describe": grpc.unary_unary_rpc_method_handler(
                    self.Describe, pb.DescribeRequest.FromString, pb.DescribeResponse.SerializeToString
                ),
            },
        )
