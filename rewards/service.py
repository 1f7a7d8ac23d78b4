"""One reward service from the client's side: its replicas, the calls with retries, backoff, hedging and
health-aware routing, chunking to the service's limits, and the per-item result cache. `RewardClient`
(rewards/client.py) holds one `Service` per reward of the run and combines what they return.

A call that fails with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED is retried with exponential
backoff and full-range jitter, on the least-loaded healthy replica, within `max_attempts` and
`retry_budget_s`; past them it raises `RewardServiceDown` naming the service. Any other status is a bug
and raises `RewardRequestError` at once.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sana_rl.reward.v1 import reward_pb2 as pb
from sana_rl.reward.v1 import reward_pb2_grpc as pb_grpc

from rewards import wire
from rewards.base import ScoreBatch, ScorerInfo
from rewards.servicer import SERVICE_NAME

if TYPE_CHECKING:
    from rewards.client import RewardClientConfig, RewardSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


class RewardError(RuntimeError):
    """Base of the client's errors."""


class RewardServiceDown(RewardError):
    """A service stayed unreachable past its retry limits; the run must stop, not train on partial rewards."""


class RewardRequestError(RewardError):
    """A service refused a call for a reason retrying cannot fix (INVALID_ARGUMENT, UNAUTHENTICATED, ...)."""


class RewardClientClosed(RewardError):
    """The client was closed while a call was waiting to retry."""


@dataclass(slots=True)
class _Row:
    """One item's answer from one scorer (what the cache holds)."""

    scores: dict[str, float]
    extras: dict[str, float]
    ok: bool
    error: str


class ResultCache:
    """LRU of per-item results keyed by (image hash, prompt, scorer, scorer version); only ok items."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._rows: collections.OrderedDict[tuple[bytes, str, str, str], _Row] = collections.OrderedDict()

    def get(self, key: tuple[bytes, str, str, str]) -> _Row | None:
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        self._rows.move_to_end(key)
        return row

    def put(self, key: tuple[bytes, str, str, str], row: _Row) -> None:
        if self.capacity == 0 or not row.ok:
            return
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)


def item_hashes(images: np.ndarray) -> list[bytes]:
    """SHA-256 (in hardware: half blake2b's time) of each item's shape and pixels, 128 bits kept."""
    out = []
    for x in images:
        h = hashlib.sha256(repr(x.shape).encode())
        h.update(np.ascontiguousarray(x).data)
        out.append(h.digest()[:16])
    return out


class _Replica:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.RewardServiceStub(channel)
        # Score takes requests already serialized by wire.encode_request_bytes (one copy of the pixels).
        self.score = channel.unary_unary(
            f"/{SERVICE_NAME}/Score",
            request_serializer=None,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        self.health = health_pb2_grpc.HealthStub(channel)
        self.healthy = True
        self.inflight = 0


class Service:
    """One reward: its replicas, retry policy, cache and what its scorer said about itself."""

    def __init__(self, spec: RewardSpec, cfg: RewardClientConfig, closed: asyncio.Event) -> None:
        if not spec.addresses:
            raise ValueError(f"reward {spec.name!r}: no address (launch it first, or set address/replicas)")
        self.spec, self.cfg, self.closed = spec, cfg, closed
        token = Path(spec.token_file).read_text().strip() if spec.token_file else None
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.replicas = [_Replica(self._channel(a)) for a in spec.addresses]
        self.sem = asyncio.Semaphore(cfg.max_concurrency)
        self.cache = ResultCache(cfg.cache_size)
        self.info = ScorerInfo(name=spec.scorer, version="", heads=[])
        self.max_request_bytes = cfg.max_message_mb * 1024 * 1024
        self._rr = 0

    def _channel(self, address: str) -> grpc.aio.Channel:
        limit = self.cfg.max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.enable_retries", 0),  # retries are ours, with our limits
            # Reconnect soon after a restart instead of gRPC's default backoff of up to 120 s.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if not self.spec.tls_ca:
            return grpc.aio.insecure_channel(address, options=options)
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(
            read(self.spec.tls_ca), read(self.spec.tls_key), read(self.spec.tls_cert)
        )
        return grpc.aio.secure_channel(address, creds, options=options)

    async def describe(self) -> None:
        msg = await self._call(
            "Describe", lambda r, t: r.stub.Describe(pb.DescribeRequest(), timeout=t, metadata=self.metadata)
        )
        if msg.name != self.spec.scorer:
            raise RewardRequestError(
                f"reward {self.spec.name!r}: expected scorer {self.spec.scorer!r}, "
                f"{', '.join(self.spec.addresses)} serves {msg.name!r}"
            )
        self.info = wire.decode_info(msg)
        self.max_request_bytes = min(self.max_request_bytes, msg.max_request_bytes or self.max_request_bytes)

    async def score(
        self,
        images: np.ndarray,
        prompts: list[str],
        hashes: list[bytes] | None,
        latents: np.ndarray | None = None,
    ) -> ScoreBatch:
        n = len(prompts)
        latents = latents if self.info.reads_latents else None  # the others would only pay for the bytes
        if hashes is not None and latents is not None:  # what the scorer reads is the cache key
            hashes = [h + g for h, g in zip(hashes, item_hashes(latents))]
        rows: list[_Row | None] = [None] * n
        if hashes is not None:
            for i in range(n):
                rows[i] = self.cache.get((hashes[i], prompts[i], self.info.name, self.info.version))
        todo = [i for i in range(n) if rows[i] is None]
        per_item = images[0].nbytes + 64 + max((len(p.encode()) for p in prompts), default=0)
        per_item += 0 if latents is None else latents[0].size * 4
        step = max(1, min(self.info.max_batch or n, int(self.max_request_bytes * 0.9) // per_item))
        chunks = [todo[a : a + step] for a in range(0, len(todo), step)]

        def pick(x: np.ndarray, ix: list[int]) -> np.ndarray:
            # a run of consecutive items is sent from a view; only cache holes make a gathered copy
            return x[ix[0] : ix[-1] + 1] if ix[-1] - ix[0] < len(ix) else x[ix]

        answers = await gather_or_cancel(
            *(
                self._score_chunk(
                    pick(images, idx),
                    [prompts[i] for i in idx],
                    None if latents is None else pick(latents, idx),
                )
                for idx in chunks
            )
        )
        for idx, (batch, version) in zip(chunks, answers):
            for j, i in enumerate(idx):
                rows[i] = row = _Row(
                    scores={k: float(v[j]) for k, v in batch.scores.items()},
                    extras={k: float(v[j]) for k, v in batch.extras.items()},
                    ok=bool(batch.ok[j]),
                    error=batch.errors[j],
                )
                if hashes is not None:
                    self.cache.put((hashes[i], prompts[i], self.info.name, version), row)
        return _rows_to_batch([r for r in rows if r is not None], self.info.heads)

    async def _score_chunk(
        self, images: np.ndarray, prompts: list[str], latents: np.ndarray | None
    ) -> tuple[ScoreBatch, str]:
        req = wire.encode_request_bytes(images, prompts, latents=latents)
        msg = await self._call("Score", lambda r, t: r.score(req, timeout=t, metadata=self.metadata))
        if msg.scorer_version != self.info.version:  # the service was restarted with other weights
            log.warning(
                "reward %s: scorer version %r -> %r", self.spec.name, self.info.version, msg.scorer_version
            )
            self.info.version = msg.scorer_version
        return wire.decode_response(msg, len(prompts)), msg.scorer_version

    # -------------------------------------------------------------- retries, hedging, routing
    async def _call(self, what: str, fn: Callable[[_Replica, float], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        start, spec = loop.time(), self.spec
        for attempt in range(1, spec.max_attempts + 1):
            left = spec.retry_budget_s - (loop.time() - start)
            try:
                async with self.sem:
                    return await self._hedged(fn, min(spec.timeout_s, max(left, 0.05)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise RewardRequestError(
                        f"reward {spec.name!r}: {what} refused: {exc.code().name}: {exc.details()}"
                    ) from None
                last = exc
            delay = random.uniform(
                0.0, min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (attempt - 1))
            )
            if attempt == spec.max_attempts or loop.time() - start + delay >= spec.retry_budget_s:
                break
            try:  # sleep, but wake at once when the client closes
                await asyncio.wait_for(self.closed.wait(), delay)
                raise RewardClientClosed(f"reward {spec.name!r}: client closed while retrying {what}")
            except TimeoutError:
                pass
        raise RewardServiceDown(
            f"reward service {spec.name!r} ({spec.scorer} at {', '.join(spec.addresses)}) is down: "
            f"{what} failed "
            f"{attempt} times in {loop.time() - start:.1f} s, last {last.code().name}: {last.details()}"
        )

    async def _hedged(self, fn: Callable[[_Replica, float], Awaitable[T]], timeout: float) -> T:
        first = self._pick(None)
        task = asyncio.ensure_future(self._on(first, fn, timeout))
        hedge = self.cfg.hedge_after_s
        if hedge is None or len(self.replicas) < 2 or hedge >= timeout:
            return await task
        done, _ = await asyncio.wait({task}, timeout=hedge)
        if done:
            return task.result()
        tasks = {task, asyncio.ensure_future(self._on(self._pick(first), fn, timeout - hedge))}
        try:
            while True:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is None or not tasks:
                        return t.result()  # the first success, else the last failure
        finally:
            for t in tasks:
                t.cancel()

    async def _on(
        self, replica: _Replica, fn: Callable[[_Replica, float], Awaitable[T]], timeout: float
    ) -> T:
        replica.inflight += 1
        try:
            return await fn(replica, timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                replica.healthy = False  # the health loop brings it back
            raise
        finally:
            replica.inflight -= 1

    def _pick(self, exclude: _Replica | None) -> _Replica:
        """Least-loaded healthy replica (round-robin among equals); any replica when none is healthy."""
        pool = [r for r in self.replicas if r is not exclude] or self.replicas
        pool = [r for r in pool if r.healthy] or pool
        self._rr += 1
        return min(pool, key=lambda r: (r.inflight, (self.replicas.index(r) - self._rr) % len(self.replicas)))

    async def watch_health(self) -> None:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while not self.closed.is_set():
            for r in self.replicas:
                try:
                    resp = await r.health.Check(request, timeout=1.0, metadata=self.metadata)
                    r.healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    r.healthy = False
            try:
                await asyncio.wait_for(self.closed.wait(), self.cfg.health_interval_s)
            except TimeoutError:
                pass

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas))


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """asyncio.gather that cancels the rest when one fails (so a dead service stops its siblings' work)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _rows_to_batch(rows: list[_Row], heads: list[str]) -> ScoreBatch:
    """Columns from per-item rows; a value a row lacks is NaN, which fails that item (never a 0)."""
    names = list(dict.fromkeys([*heads, *(k for r in rows for k in r.scores)]))
    extra_names = list(dict.fromkeys(k for r in rows for k in r.extras))
    return ScoreBatch(
        scores={k: np.array([r.scores.get(k, math.nan) for r in rows], dtype=np.float32) for k in names},
        extras={
            k: np.array([r.extras.get(k, math.nan) for r in rows], dtype=np.float32) for k in extra_names
        },
        ok=np.array([r.ok for r in rows], dtype=bool),
        errors=[r.error for r in rows],
    )
