"""The trainer's side of the reward services: many services at once, with retries, hedging, health-aware
routing, per-reward running normalisation, weighted combination and a result cache.

Each recipe reward (`RewardSpec`) is one service, possibly with replicas. For every batch the client
sends the items each service has not scored before (cache key: image bytes hash, prompt, scorer version),
in chunks that fit the service's max batch and message size, at most `max_concurrency` calls in flight
per service. A call that fails with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED is retried with
exponential backoff and full-range jitter, on the least-loaded healthy replica, within `max_attempts`
and `retry_budget_s`; past them the call raises `RewardServiceDown` naming the service, and the run stops
with a checkpoint rather than train on partial rewards. Any other status (INVALID_ARGUMENT, ...) is a
bug and raises `RewardRequestError` at once.

An item a service could not score is marked failed (ok False, total NaN, a reason): never a silent 0,
which would distort its whole group's baseline (DESIGN.md s.7).

Combination: total = sum_r weight_r * z_r, where z_r = (x_r - mean_r) / (std_r + eps) with running
moments per reward when `normalize` (so a reward in kB does not drown one in [0, 1]), else the raw x_r.
The moments are part of the checkpoint (`state()` / `load_state()`).

    cfg = RewardClientConfig(rewards=[RewardSpec(name="jpeg", scorer="jpeg_compressibility",
                                                 address="127.0.0.1:50051")])
    async with RewardClient(cfg) as client:          # or RewardClientSync(cfg).score_sync(...)
        scores = await client.score(images_uint8_nhwc, prompts)
        scores.total, scores.ok                      # float32 [N], bool [N]
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import random
import shlex
import shutil
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sana_rl.reward.v1 import reward_pb2 as pb
from sana_rl.reward.v1 import reward_pb2_grpc as pb_grpc

from rewards import wire
from rewards.base import ScoreBatch, ScorerInfo
from rewards.servicer import SERVICE_NAME

if TYPE_CHECKING:
    from actors.records import Rewards

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


@dataclass(kw_only=True, slots=True)
class RewardSpec:
    """One reward of a recipe: which scorer, where it runs, how much it counts, how hard to retry."""

    name: str
    """Unique name in the run; keys the scores, metrics and normaliser."""
    scorer: str
    """Registered scorer the service must host (checked against its Describe)."""
    weight: float = 1.0
    """Weight in the combined reward (may be negative)."""
    address: str | None = None
    """host:port of a running service; None: the orchestrator launches one (RewardHost)."""
    replicas: list[str] = field(default_factory=list)
    """More host:port addresses serving the same scorer; calls go to the least-loaded healthy one."""
    timeout_s: float = field(default=60.0, metadata={"gt": 0.0})
    """Deadline of one call."""
    max_attempts: int = field(default=100, metadata={"ge": 1})
    """Tries per call, the first included. The default lets `retry_budget_s` end the retries: with the
    client's backoff (0.1 s doubling to 5 s, jittered) six tries would span only ~1.5 s, shorter than a
    reward host takes to restart."""
    retry_budget_s: float = field(default=120.0, metadata={"gt": 0.0})
    """Total time one call may take with its retries before the service counts as down."""
    normalize: bool = True
    """Divide by a running std (after removing a running mean) before weighting."""
    token_file: str | None = None
    """File with the bearer token the service wants."""
    tls_ca: str | None = None
    """PEM CA that signed the service's certificate; enables TLS."""
    tls_cert: str | None = None
    """PEM client certificate for mTLS (with tls_key)."""
    tls_key: str | None = None
    """PEM client key for mTLS."""
    python: str | None = None
    """Python executable of the environment a launched service runs in (its own venv, e.g.
    `.venv-imagereward/bin/python` from `make env-imagereward`); None: ours. Must exist where the run is
    started (and on every node that may host the service)."""
    scorer_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the scorer when the orchestrator launches it (weights path, device)."""

    def validate(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"weight: must be finite, got {self.weight}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: tls_cert and tls_key go together")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("tls_cert: a client certificate (mTLS) needs tls_ca")
        # With a missing interpreter Ray raises nothing: the actor just never comes up (ray.get waits out
        # its timeout), so say so at load time. The first word only: Ray's py_executable takes a command.
        if self.python is not None and not shutil.which((shlex.split(self.python) or [""])[0]):
            raise ValueError(f"python: {self.python!r} is not an executable (build that environment first)")

    @property
    def addresses(self) -> list[str]:
        return list(dict.fromkeys(([self.address] if self.address else []) + self.replicas))


@dataclass(kw_only=True, slots=True)
class RewardClientConfig:
    """The client of all rewards of a run."""

    rewards: list[RewardSpec]
    max_concurrency: int = field(default=4, metadata={"ge": 1})
    """Calls in flight per service."""
    hedge_after_s: float | None = field(default=None, metadata={"gt": 0.0})
    """Send a second copy of a call to another replica when the first has not answered by then."""
    backoff_initial_s: float = field(default=0.1, metadata={"gt": 0.0})
    backoff_max_s: float = field(default=5.0, metadata={"gt": 0.0})
    health_interval_s: float = field(default=2.0, metadata={"gt": 0.0})
    """How often replicas are health-checked."""
    cache_size: int = field(default=4096, metadata={"ge": 0})
    """Items remembered per reward (0: no cache)."""
    norm_eps: float = field(default=1e-6, metadata={"gt": 0.0})
    max_message_mb: int = field(default=64, metadata={"ge": 1})


class RewardError(RuntimeError):
    """Base of the client's errors."""


class RewardServiceDown(RewardError):
    """A service stayed unreachable past its retry limits; the run must stop, not train on partial rewards."""


class RewardRequestError(RewardError):
    """A service refused a call for a reason retrying cannot fix (INVALID_ARGUMENT, UNAUTHENTICATED, ...)."""


class RewardClientClosed(RewardError):
    """The client was closed while a call was waiting to retry."""


@dataclass(kw_only=True, slots=True)
class CombinedScores:
    """All rewards of N items and their weighted combination."""

    total: np.ndarray  # float32 [N] sum of weight * normalised primary score; NaN where not ok
    ok: np.ndarray  # bool [N] every reward scored the item
    raw: dict[str, np.ndarray]  # reward name -> float32 [N] primary score as the service gave it
    normalized: dict[str, np.ndarray]  # reward name -> float32 [N] what entered the total
    extras: dict[str, np.ndarray]  # "reward/head" -> float32 [N] other heads and sub-scores
    errors: list[str]  # [N] "reward: reason; ..." for failed items, "" where ok

    def to_record(self) -> Rewards:
        """The typed record the controller passes on (actors.records.Rewards, torch tensors)."""
        import torch

        from actors.records import Rewards

        return Rewards(
            total=torch.from_numpy(self.total.copy()),
            per_scorer={k: torch.from_numpy(v.copy()) for k, v in self.raw.items()},
            extras={k: torch.from_numpy(v.copy()) for k, v in self.extras.items()},
            ok=torch.from_numpy(self.ok.copy()),
        )


class RunningNorm:
    """Running mean and variance (Chan et al.'s parallel update) of one reward."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.count, self.mean, self.m2, self.eps = 0, 0.0, 0.0, eps

    def update(self, x: np.ndarray) -> None:
        x = x[np.isfinite(x)].astype(np.float64)
        if x.size == 0:
            return
        n, mean = x.size, float(x.mean())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += float(((x - mean) ** 2).sum()) + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / (self.std + self.eps)).astype(np.float32)

    def state(self) -> dict[str, float]:
        return {"count": float(self.count), "mean": self.mean, "m2": self.m2}

    def load(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


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


class _Service:
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

    async def score(self, images: np.ndarray, prompts: list[str], hashes: list[bytes] | None) -> ScoreBatch:
        n = len(prompts)
        rows: list[_Row | None] = [None] * n
        if hashes is not None:
            for i in range(n):
                rows[i] = self.cache.get((hashes[i], prompts[i], self.info.name, self.info.version))
        todo = [i for i in range(n) if rows[i] is None]
        per_item = images[0].nbytes + 64 + max((len(p.encode()) for p in prompts), default=0)
        step = max(1, min(self.info.max_batch or n, int(self.max_request_bytes * 0.9) // per_item))
        chunks = [todo[a : a + step] for a in range(0, len(todo), step)]
        # a run of consecutive items is sent from a view; only cache holes make a gathered copy
        pick = lambda ix: images[ix[0] : ix[-1] + 1] if ix[-1] - ix[0] < len(ix) else images[ix]  # noqa: E731
        answers = await _gather(*(self._score_chunk(pick(idx), [prompts[i] for i in idx]) for idx in chunks))
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

    async def _score_chunk(self, images: np.ndarray, prompts: list[str]) -> tuple[ScoreBatch, str]:
        req = wire.encode_request_bytes(images, prompts)
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


class RewardClient:
    """Async client of all the run's reward services. Use as `async with RewardClient(cfg) as c:`."""

    def __init__(self, cfg: RewardClientConfig) -> None:
        names = [s.name for s in cfg.rewards]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"rewards: need at least one reward and unique names, got {names}")
        self.cfg = cfg
        self._services: dict[str, _Service] = {}
        self._norms = {s.name: RunningNorm(cfg.norm_eps) for s in cfg.rewards}
        self._closed = asyncio.Event()
        self._health: list[asyncio.Task[None]] = []

    async def start(self) -> RewardClient:
        """Open channels and Describe every service (with retries); raises RewardServiceDown."""
        self._services = {s.name: _Service(s, self.cfg, self._closed) for s in self.cfg.rewards}
        try:
            await _gather(*(svc.describe() for svc in self._services.values()))
        except BaseException:
            await self.close()
            raise
        self._health = [asyncio.ensure_future(svc.watch_health()) for svc in self._services.values()]
        return self

    async def __aenter__(self) -> RewardClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop health checks, wake retries (they raise RewardClientClosed), close channels."""
        self._closed.set()
        await asyncio.gather(*self._health, return_exceptions=True)
        await asyncio.gather(*(svc.close() for svc in self._services.values()))

    def info(self, name: str) -> ScorerInfo:
        return self._services[name].info

    def cache_stats(self, name: str) -> tuple[int, int]:
        """(hits, misses) of one reward's result cache."""
        cache = self._services[name].cache
        return cache.hits, cache.misses

    async def score(self, images: np.ndarray, prompts: list[str], *, update: bool = True) -> CombinedScores:
        """Score with every reward concurrently and combine; raises RewardServiceDown / RewardRequestError.

        `update=False` normalises with the running moments without adding this batch to them: evaluation
        must not change what training rollouts are scored against.
        """
        _check_input(images, prompts)
        hashes = item_hashes(images) if self.cfg.cache_size else None
        specs = self.cfg.rewards
        batches = await _gather(*(self._services[s.name].score(images, prompts, hashes) for s in specs))
        n = len(prompts)
        ok = np.ones(n, dtype=bool)
        total = np.zeros(n, dtype=np.float32)
        raw: dict[str, np.ndarray] = {}
        normalized: dict[str, np.ndarray] = {}
        extras: dict[str, np.ndarray] = {}
        reasons: list[list[str]] = [[] for _ in range(n)]
        for spec, batch in zip(specs, batches):
            heads = self._services[spec.name].info.heads
            x = batch.scores[heads[0]]
            if spec.normalize:
                if update:
                    self._norms[spec.name].update(x[batch.ok])
                z = self._norms[spec.name](x)
            else:
                z = x.astype(np.float32)
            raw[spec.name], normalized[spec.name] = x, z
            total += np.float32(spec.weight) * np.where(batch.ok, z, 0.0).astype(np.float32)
            extras.update({f"{spec.name}/{k}": v for k, v in batch.scores.items() if k != heads[0]})
            extras.update({f"{spec.name}/{k}": v for k, v in batch.extras.items()})
            ok &= batch.ok
            for i in np.flatnonzero(~batch.ok):
                reasons[i].append(f"{spec.name}: {batch.errors[i]}")
        total[~ok] = np.nan  # a failed item never looks like a score
        return CombinedScores(
            total=total,
            ok=ok,
            raw=raw,
            normalized=normalized,
            extras=extras,
            errors=["; ".join(r) for r in reasons],
        )

    def state(self) -> dict[str, dict[str, float]]:
        """Normaliser moments per reward, for the checkpoint."""
        return {name: norm.state() for name, norm in self._norms.items()}

    def load_state(self, state: dict[str, dict[str, float]]) -> None:
        for name, moments in state.items():
            if name not in self._norms:
                raise ValueError(
                    f"rewards: checkpoint has a normaliser for {name!r}, the recipe has no such reward"
                )
            self._norms[name].load(moments)


class RewardClientSync:
    """The same client for plain synchronous code (the controller); its event loop runs on a thread.
    `RewardClientSync(cfg).score_sync(images, prompts) -> CombinedScores`; `close()` when done."""

    def __init__(self, cfg: RewardClientConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
        self._thread.start()
        try:
            self.client: RewardClient = self._run(RewardClient(cfg).start())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def score_sync(self, images: np.ndarray, prompts: list[str], *, update: bool = True) -> CombinedScores:
        return self._run(self.client.score(images, prompts, update=update))

    def state(self) -> dict[str, dict[str, float]]:
        return self.client.state()

    def load_state(self, state: dict[str, dict[str, float]]) -> None:
        self.client.load_state(state)

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self.client.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _gather(*aws: Awaitable[T]) -> list[T]:
    """asyncio.gather that cancels the rest when one fails (so a dead service stops its siblings' work)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _check_input(images: np.ndarray, prompts: list[str]) -> None:
    if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(
            f"images: expected uint8 [N, H, W, 3] or [N, T, H, W, 3], got {images.dtype} {images.shape}"
        )
    if len(prompts) != images.shape[0] or not prompts:
        raise ValueError(
            f"prompts: {len(prompts)} prompts for {images.shape[0]} images (need one per image, N > 0)"
        )


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
