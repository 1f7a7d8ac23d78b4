"""The trainer's side of the reward services: many services at once, with retries, hedging, health-aware
routing, per-reward running normalisation, weighted combination and a result cache.

Each recipe reward (`RewardSpec`) is one service, possibly with replicas. For every batch the client
sends the items each service has not scored before (cache key: image bytes hash, prompt, scorer version),
in chunks that fit the service's max batch and message size, at most `max_concurrency` calls in flight
per service. Calls that fail for a transient reason are retried on the least-loaded healthy replica
within the spec's limits; past them the call raises `RewardServiceDown` naming the service, and the run
stops with a checkpoint rather than train on partial rewards; any other failure is a bug and raises
`RewardRequestError` at once (the calls, retries and cache are in rewards/service.py).

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
import math
import shlex
import shutil
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from rewards.base import ScorerInfo
from rewards.service import (
    ResultCache,
    RewardClientClosed,
    RewardError,
    RewardRequestError,
    RewardServiceDown,
    Service,
    gather_or_cancel,
    item_hashes,
)

if TYPE_CHECKING:
    from actors.records import Rewards

T = TypeVar("T")


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


class RewardClient:
    """Async client of all the run's reward services. Use as `async with RewardClient(cfg) as c:`."""

    def __init__(self, cfg: RewardClientConfig) -> None:
        names = [s.name for s in cfg.rewards]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"rewards: need at least one reward and unique names, got {names}")
        self.cfg = cfg
        self._services: dict[str, Service] = {}
        self._norms = {s.name: RunningNorm(cfg.norm_eps) for s in cfg.rewards}
        self._closed = asyncio.Event()
        self._health: list[asyncio.Task[None]] = []

    async def start(self) -> RewardClient:
        """Open channels and Describe every service (with retries); raises RewardServiceDown."""
        self._services = {s.name: Service(s, self.cfg, self._closed) for s in self.cfg.rewards}
        try:
            await gather_or_cancel(*(svc.describe() for svc in self._services.values()))
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

    async def score(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        latents: np.ndarray | None = None,
        update: bool = True,
    ) -> CombinedScores:
        """Score with every reward concurrently and combine; raises RewardServiceDown / RewardRequestError.

        `latents` (float32 [N, ...], the items' latents) go only to the services whose scorer reads them
        (its Describe says so); the others get the pixels alone. `update=False` normalises with the running
        moments without adding this batch to them: evaluation must not change what training rollouts are
        scored against.
        """
        _check_input(images, prompts, latents)
        hashes = item_hashes(images) if self.cfg.cache_size else None
        specs = self.cfg.rewards
        batches = await gather_or_cancel(
            *(self._services[s.name].score(images, prompts, hashes, latents) for s in specs)
        )
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

    def score_sync(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        latents: np.ndarray | None = None,
        update: bool = True,
    ) -> CombinedScores:
        return self._run(self.client.score(images, prompts, latents=latents, update=update))

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


def _check_input(images: np.ndarray, prompts: list[str], latents: np.ndarray | None) -> None:
    if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(
            f"images: expected uint8 [N, H, W, 3] or [N, T, H, W, 3], got {images.dtype} {images.shape}"
        )
    if len(prompts) != images.shape[0] or not prompts:
        raise ValueError(
            f"prompts: {len(prompts)} prompts for {images.shape[0]} images (need one per image, N > 0)"
        )
    if latents is not None and (latents.ndim < 2 or latents.shape[0] != images.shape[0]):
        raise ValueError(f"latents: expected [{images.shape[0]}, ...] (one per image), got {latents.shape}")


__all__ = [
    "CombinedScores",
    "ResultCache",
    "RewardClient",
    "RewardClientClosed",
    "RewardClientConfig",
    "RewardClientSync",
    "RewardError",
    "RewardRequestError",
    "RewardServiceDown",
    "RewardSpec",
    "RunningNorm",
    "item_hashes",
]
