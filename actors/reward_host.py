"""A Ray actor that hosts one reward service (rewards/server.py) in its own process, optionally in its
own Python environment, so a scorer with conflicting dependencies (ImageReward's old transformers,
vLLM's pinned torch) runs beside the trainer without sharing its packages.

The actor only hosts: the trainer still reaches the service over gRPC (RewardClient), exactly as it
would reach one started by hand, so retries, deadlines and health checks work the same way.

    host = launch_reward_host(spec, server=ServerConfig(max_batch=16), num_gpus=1)
    address = ray.get(host.start.remote())     # "127.0.0.1:41234" once serving; goes into spec.address
    ray.get(host.ready.remote())               # True while serving
    ray.get(host.stop.remote())                # graceful: NOT_SERVING, drain, stop; start() serves again

Own environment: set `RewardSpec.python` to the interpreter of a venv that has this project and the
same Ray installed (`make env-imagereward` builds one); Ray starts the actor's worker with it through
`runtime_env={"py_executable": ...}`.

The actor serves from its constructor, so when Ray restarts it (`max_restarts`, after the process died)
the service comes back by itself; with a fixed port in ServerConfig it comes back at the same address and
clients simply retry through the gap (with port 0 it gets a new port: ask `start()` for it).
"""

from __future__ import annotations

from typing import Any

from rewards.client import RewardSpec
from rewards.server import RunningServer, ServerConfig, start_server

_WILDCARDS = ("0.0.0.0", "::", "[::]")


class RewardHost:
    """Hosts one scorer's gRPC server on the actor's event loop (an async Ray actor)."""

    async def __init__(  # type: ignore[misc]  # Ray awaits async constructors of async actors
        self, scorer: str, *, server: ServerConfig | None = None, scorer_kwargs: dict[str, Any] | None = None
    ) -> None:
        self.scorer = scorer
        self.cfg = server or ServerConfig()
        self.cfg.validate()
        self.scorer_kwargs = dict(scorer_kwargs or {})
        self._running: RunningServer | None = None
        await self.start()

    async def start(self) -> str:
        """Build the scorer and start serving (idempotent); returns the host:port clients dial."""
        from rewards.base import make_scorer

        if self._running is None:
            model = make_scorer(self.scorer, **self.scorer_kwargs)
            self._running = await start_server(model, self.cfg)
        host = self._running.host
        if host in _WILDCARDS:  # listening everywhere: give clients this node's address
            import ray

            host = ray.util.get_node_ip_address()
        return f"[{host}]:{self._running.port}" if ":" in host else f"{host}:{self._running.port}"

    async def ready(self) -> bool:
        """True while the server runs and its queue takes work."""
        return self._running is not None and self._running.core.accepting

    async def stop(self) -> None:
        """Graceful stop (health NOT_SERVING, drain, stop with the configured grace)."""
        if self._running is not None:
            running, self._running = self._running, None
            await running.stop()


def launch_reward_host(
    spec: RewardSpec,
    *,
    server: ServerConfig | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_restarts: int = 3,
    **actor_options: Any,
) -> Any:
    """Create the RewardHost actor for `spec` (in `spec.python`'s environment when set); returns its
    handle. Call `start` on it to serve."""
    import ray

    spec.validate()  # a recipe is validated on load; a spec built in code is checked here (python: exists)
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_restarts": max_restarts,
        **actor_options,  # name, scheduling_strategy (placement group bundle)
    }
    if spec.python:
        options["runtime_env"] = {"py_executable": spec.python}
    kwargs = dict(spec.scorer_kwargs)
    return ray.remote(RewardHost).options(**options).remote(spec.scorer, server=server, scorer_kwargs=kwargs)
