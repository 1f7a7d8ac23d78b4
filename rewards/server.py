"""One reward microservice: a grpc.aio server hosting one scorer, with health checking and reflection.

    sana-rl serve-reward --scorer jpeg_compressibility --port 50051
    sana-rl serve-reward --scorer hpsv2 --host 0.0.0.0 --port 50051 --token-file /run/secrets/reward \
        --tls-cert server.pem --tls-key server.key [--tls-ca clients-ca.pem]   # mTLS with --tls-ca

Security defaults: it listens on 127.0.0.1; any other address needs a bearer token (read from a file,
never from the command line, where `ps` would show it). TLS is optional, mTLS when a CA is given.
Nothing but protobuf crosses the wire.

Message size limits are raised on purpose: a batch of 16 images at 512 px is 12.6 MB, three times
gRPC's 4 MB default; the default here, 64 MB, holds 16 images at 1024 px.

Shutdown is graceful: health turns NOT_SERVING (clients route elsewhere), the queue stops taking work
and is drained, then the server stops with a grace period for the answers in flight.

From Python:
    running = await start_server(make_scorer("jpeg_compressibility"), ServerConfig(port=0))
    print(running.address)  # 127.0.0.1:41234
    await running.stop()
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rewards.base import RewardModel, make_scorer
from rewards.core import ScoringCore
from rewards.interceptors import StatusInterceptor
from rewards.servicer import SERVICE_NAME, RewardServicer

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    """How one reward service listens, batches and protects itself."""

    host: str = "127.0.0.1"
    """Bind address. Anything but loopback requires `token_file`."""
    port: int = field(default=0, metadata={"ge": 0, "le": 65535})
    """TCP port; 0 picks a free one (see RunningServer.port)."""
    max_batch: int = field(default=32, metadata={"ge": 1})
    """Most items scored at once (capped by the scorer's own max_batch)."""
    max_wait_ms: float = field(default=5.0, metadata={"ge": 0.0})
    """How long the batcher waits for more requests to fill a batch."""
    queue_size: int = field(default=256, metadata={"ge": 1})
    """Requests that may wait; one more is answered RESOURCE_EXHAUSTED."""
    max_message_mb: int = field(default=64, metadata={"ge": 1})
    """Largest request or response in MiB."""
    token_file: str | None = None
    """File holding the bearer token clients must send; required off loopback."""
    tls_cert: str | None = None
    """PEM certificate chain of the server (TLS); needs tls_key."""
    tls_key: str | None = None
    """PEM private key of the server."""
    tls_ca: str | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."""
    grace_s: float = field(default=5.0, metadata={"ge": 0.0})
    """Drain and in-flight grace on shutdown."""

    def validate(self) -> None:
        if not _is_loopback(self.host) and not self.token_file:
            raise ValueError(
                f"token_file: binding {self.host} (not loopback) requires a bearer token file (--token-file)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: tls_cert and tls_key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("tls_ca: mTLS (tls_ca) needs server TLS (tls_cert and tls_key)")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


@dataclass(kw_only=True, slots=True)
class RunningServer:
    """A started service: its bound address, its data plane and how to stop it."""

    host: str
    port: int
    tls: bool
    core: ScoringCore
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    grace_s: float

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, drain the queue, then stop with `grace` seconds for calls in flight."""
        grace = self.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        drained = await self.core.close(grace_s=grace)
        if not drained:
            log.warning("%s: stopped before the queue drained", self.core.info.name)
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(model: RewardModel, cfg: ServerConfig) -> RunningServer:
    """Start serving `model` as configured; returns once the port is bound and health says SERVING."""
    cfg.validate()
    token = _read_secret(cfg.token_file, "token_file").strip() if cfg.token_file else None
    if cfg.token_file and not token:
        raise ValueError(f"token_file: {cfg.token_file} is empty")
    core = ScoringCore(
        model, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1000.0, queue_size=cfg.queue_size
    )
    await core.start()
    limit = cfg.max_message_bytes
    server = grpc.aio.server(
        interceptors=[StatusInterceptor(token)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Without this, a second server could silently share the port of a live one.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers([RewardServicer(core, max_request_bytes=limit).handler()])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    target = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
    try:
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials(
                [(_read_secret(cfg.tls_key, "tls_key"), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_ca).read_bytes() if cfg.tls_ca else None,
                require_client_auth=cfg.tls_ca is not None,
            )
            port = server.add_secure_port(target, creds)
        else:
            port = server.add_insecure_port(target)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        await core.close(0)
        raise OSError(f"cannot listen on {target}: {exc}") from exc
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set(SERVICE_NAME, serving)
    await health_servicer.set("", serving)
    return RunningServer(
        host=cfg.host,
        port=port,
        tls=cfg.tls_cert is not None,
        core=core,
        server=server,
        health=health_servicer,
        grace_s=cfg.grace_s,
    )


async def serve(
    scorer_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    queue_size: int = 256,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    scorer_kwargs: dict[str, Any] | None = None,
    max_message_mb: int = 64,
) -> None:
    """Build the scorer, serve it until SIGTERM/SIGINT, then shut down gracefully (the CLI's entry).
    Prints one line `reward service <name> <version> listening on <host:port>` once ready."""
    cfg = ServerConfig(
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        max_message_mb=max_message_mb,
        token_file=token_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    cfg.validate()  # before loading weights: a bad flag should fail in a second, not after a minute
    model = make_scorer(scorer_name, **(scorer_kwargs or {}))
    running = await start_server(model, cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread: the caller cancels us instead
            pass
    info = running.core.info
    scheme = "tls" if running.tls else "plaintext"
    print(f"reward service {info.name} {info.version} listening on {running.address} ({scheme})", flush=True)
    try:
        await stop.wait()
    finally:
        await running.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: we cannot know where it resolves, so treat it as exposed
        return False


def _read_secret(path: str, what: str) -> bytes:
    """Read a token or key file; warn when others can read it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {path} is not a file")
    if os.name == "posix" and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: %s is readable by other users; chmod 600 it", what, path)
    return p.read_bytes()
