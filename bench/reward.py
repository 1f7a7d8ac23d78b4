"""Reward service throughput: images/s of `jpeg_compressibility` through the gRPC service against a bare
grpc.aio server doing the same work, a bare echo (transport only) and scoring in-process; then every model
scorer through the service against scoring in-process (bench/reward_scorers.py).

    sana-rl bench reward --quick      # about 1 min on a 2-core CPU (jpeg cases, tiny model scorers)
    sana-rl bench reward

Cases: 64 px and 512 px images, batch 16, 1 and 8 requests in flight. The servers run in one child
process (the client is this process), as they would beside a trainer.

- service: our RewardService as RewardClient calls it (request serialized by wire.encode_request_bytes,
  validation, bounded queue, dynamic batcher with max_batch 16, interceptor, per-item statuses).
- baseline, "bare": one generic grpc.aio handler that receives the same pixel bytes (behind a 16-byte
  shape header), scores them inline with the same scorer and returns the floats. It is the transport
  plus the unavoidable scoring, so service / bare is what our protocol and data plane cost; the target
  is that they cost at most 20% (ratio >= 0.83x).
- in the note (and `extra`): "echo" (the same bytes in, 16 floats out, no scoring: the transport
  alone) and "in-process" (scorer.score on the array, no transport), timed interleaved with each other.
Building each request (serializing the pixels) is part of every timed call, as it is for a trainer.

Stream cases (informational, no target): the same requests, all in flight at once, over one ScoreStream
against as many unary Score calls, for chunks of 1 and 8 images at 32 px and 16 at 256 px; what a client
would gain by sending a batch's chunks over a stream (RewardClient sends unary calls).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from bench.harness import Row, Timing, measure_pair
from rewards.base import RewardModel, make_scorer

SUITE = "reward"
SCORER = "jpeg_compressibility"
BATCH = 16
TARGET = 1 / 1.2  # the service may take at most 20% longer than the bare transport + scoring
BARE, ECHO = "/bench.Bare/Score", "/bench.Bare/Echo"


def smooth_images(size: int, seed: int = 0, n: int = BATCH) -> np.ndarray:
    """uint8 [n, size, size, 3]: smooth colour fields with noise, closer to samples than pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((1, size // 8, size // 8, 1), np.float32))
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def _bare_payload(images: np.ndarray) -> bytes:
    return np.asarray(images.shape, dtype="<i4").tobytes() + images.tobytes()


async def _serve() -> None:
    """Child process: our service, the bare scoring server and the echo server; prints their addresses."""
    import grpc

    from rewards.server import ServerConfig, start_server

    ours = await start_server(make_scorer(SCORER), ServerConfig(max_batch=BATCH, max_wait_ms=2.0))
    scorer = make_scorer(SCORER)

    async def bare(raw: bytes, context: Any) -> bytes:
        shape = tuple(np.frombuffer(raw[:16], dtype="<i4"))
        images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(shape)
        return scorer.score(images, [""] * shape[0]).scores[SCORER].tobytes()

    async def echo(raw: bytes, context: Any) -> bytes:
        return np.zeros(int(np.frombuffer(raw[:4], dtype="<i4")[0]), np.float32).tobytes()

    limit = 64 << 20
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(bare),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Bare", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"ours": ours.address, "bare": f"127.0.0.1:{port}"}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await ours.stop(0)
    await server.stop(0)


class _Client:
    """Channels on an event loop in a background thread, driven synchronously for bench.harness."""

    def __init__(self, ours: str, bare: str) -> None:
        import grpc

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]

        async def open_() -> None:
            from sana_rl.reward.v1 import reward_pb2 as pb

            from rewards.servicer import SERVICE_NAME

            self.ours_channel = grpc.aio.insecure_channel(ours, options=opts)
            self.bare_channel = grpc.aio.insecure_channel(bare, options=opts)
            # as RewardClient sends it: pre-serialized by wire.encode_request_bytes
            self.score = self.ours_channel.unary_unary(
                f"/{SERVICE_NAME}/Score", response_deserializer=pb.ScoreResponse.FromString
            )
            self.stream = self.ours_channel.stream_stream(
                f"/{SERVICE_NAME}/ScoreStream", response_deserializer=pb.ScoreResponse.FromString
            )
            self.bare = self.bare_channel.unary_unary(BARE)
            self.echo = self.bare_channel.unary_unary(ECHO)

        self.run(open_())

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]

    def flood(
        self, call: Callable[[Any], Awaitable[Any]], make: Callable[[], Any], total: int, conc: int
    ) -> None:
        """Send `total` requests, each built by `make` (encoding is part of the cost), `conc` in flight."""

        async def worker(n: int) -> None:
            for _ in range(n):
                await call(make())

        async def all_() -> None:
            await asyncio.gather(*(worker(total // conc + (i < total % conc)) for i in range(conc)))

        self.run(all_())

    def stream_all(self, make: Callable[[], bytes], total: int) -> None:
        """Send `total` requests over one ScoreStream and read every answer."""

        async def all_() -> None:
            answers = [a async for a in self.stream(iter([make() for _ in range(total)]))]
            assert len(answers) == total, f"{len(answers)} answers to {total} requests"

        self.run(all_())

    def close(self) -> None:
        self.run(self.ours_channel.close())
        self.run(self.bare_channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def run(quick: bool) -> list[Row]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import asyncio, bench.reward as r; asyncio.run(r._serve())"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    addresses = json.loads(proc.stdout.readline())
    client = _Client(addresses["ours"], addresses["bare"])
    scorer = make_scorer(SCORER)
    try:
        rows = [
            _case(client, scorer, smooth_images(size), conc, quick) for size in (64, 512) for conc in (1, 8)
        ]
        rows += [_stream_case(client, size, n, total, quick) for size, n, total in STREAM_CASES]
    finally:
        client.close()
        proc.stdin.close()
        proc.wait(timeout=30)
    from bench import reward_scorers  # imports this module: not at the top

    return rows + reward_scorers.run(quick)


def _case(client: _Client, scorer: RewardModel, images: np.ndarray, conc: int, quick: bool) -> Row:
    from rewards.wire import encode_request_bytes

    size = images.shape[1]
    prompts, ids = ["a photo"] * BATCH, [str(i) for i in range(BATCH)]
    total = conc * (2 if size >= 512 and quick else 4)
    warmup, repeats = (1, 3) if quick else (2, 9)
    ours = lambda: encode_request_bytes(images, prompts, item_ids=ids)  # noqa: E731
    bare = lambda: _bare_payload(images)  # noqa: E731
    t_ours, t_bare = measure_pair(
        lambda: client.flood(client.score, ours, total, conc),
        lambda: client.flood(client.bare, bare, total, conc),
        warmup=warmup,
        repeats=repeats,
    )
    # the informational references, also interleaved with each other
    t_echo, t_inproc = measure_pair(
        lambda: client.flood(client.echo, bare, total, conc),
        lambda: [scorer.score(images, prompts) for _ in range(total)],
        warmup=1,
        repeats=repeats,
    )
    return _row(size, conc, total, t_ours, t_bare, t_echo, t_inproc, images.nbytes)


STREAM_CASES = ((32, 1, 128), (32, 8, 32), (256, 16, 8))
"""(image side, images per request, requests): many small chunks, then fewer larger ones."""


def _stream_case(client: _Client, size: int, n: int, total: int, quick: bool) -> Row:
    from rewards.wire import encode_request_bytes

    images, prompts = smooth_images(size, n=n), ["a photo"] * n
    make = lambda: encode_request_bytes(images, prompts)  # noqa: E731
    t_stream, t_unary = measure_pair(
        lambda: client.stream_all(make, total),
        lambda: client.flood(client.score, make, total, total),
        warmup=1 if quick else 2,
        repeats=3 if quick else 9,
    )
    per_s = lambda t: total * n / t.median_s  # noqa: E731
    return Row(
        suite=SUITE,
        case=f"{SCORER} {size}px, {total} requests of {n}, one ScoreStream",
        metric="images/s",
        value=per_s(t_stream),
        baseline_name=f"{total} unary Score calls in flight",
        baseline=per_s(t_unary),
        ratio=per_s(t_stream) / per_s(t_unary),
        spread=per_s(t_stream) * t_stream.iqr_s / t_stream.median_s,
        note=f"{images.nbytes / 1e6:.3f} MB/request",
    )


def _row(
    size: int, conc: int, total: int, ours: Timing, bare: Timing, echo: Timing, inproc: Timing, nbytes: int
) -> Row:
    per_s = lambda t: total * BATCH / t.median_s  # noqa: E731
    ratio = per_s(ours) / per_s(bare)
    return Row(
        suite=SUITE,
        case=f"{SCORER} {size}px batch {BATCH} concurrency {conc}",
        metric="images/s",
        value=per_s(ours),
        baseline_name="bare grpc.aio, same bytes, scored inline",
        baseline=per_s(bare),
        ratio=ratio,
        target=f">= {TARGET:.2f}x",
        met=ratio >= TARGET,
        spread=per_s(ours) * ours.iqr_s / ours.median_s,
        note=f"{nbytes / 1e6:.2f} MB/request; echo (transport only) {per_s(echo):.0f}/s, "
        f"in-process {per_s(inproc):.0f}/s",
        extra={
            "echo_images_per_s": per_s(echo),
            "in_process_images_per_s": per_s(inproc),
            "service_vs_in_process": per_s(ours) / per_s(inproc),
        },
    )
