"""Starting or joining the Ray cluster a run uses: loopback only unless a cluster address is given.

    info = connect(ClusterConfig(num_cpus=4))            # embedded single-node cluster on 127.0.0.1
    info = connect(ClusterConfig(address="10.0.0.5:6379"))  # join a cluster someone started

Why the embedded cluster needs more than `_node_ip_address="127.0.0.1"`: Ray (2.60) deliberately turns a
loopback node IP into this machine's "remotely reachable" address (`services.resolve_ip_for_localhost`,
ray-project/ray#26293) and then binds GCS, raylet, object manager, core workers, the dashboard agent and
the runtime-env agent to that public address, so `dashboard_host="127.0.0.1"` alone protects only the
dashboard. Ray keeps loopback only in its single-node mode, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the
default on macOS/Windows): then the node IP stays 127.0.0.1 and every Ray server binds to it. That mode
forbids adding other nodes to this cluster, which an embedded cluster never does. The variable must also
reach every Ray child process (job drivers connect back to `127.0.0.1:<gcs port>` and would otherwise
resolve it to the public address, ray-project/ray#59110), so it is set in the environment they inherit.

Checked by tests/integration/test_cluster.py: with this, every TCP socket the cluster listens on is on
127.0.0.1 (or `::ffff:127.0.0.1`); nothing binds to 0.0.0.0, `::` or the public interface. Three ports are
fixed by Ray and cannot be moved from `ray.init` (the autoscaler's and the dashboard's Prometheus ports
44217 / 44227, the dashboard agent's HTTP port 52365): they also bind 127.0.0.1, and when two embedded
clusters run at once the second one loses only those endpoints.

Ray's token authentication (on by default for new local clusters in Ray 2.60; the token is generated into
~/.ray/auth_token when missing) stays on: `RAY_AUTH_MODE=disabled` is refused rather than obeyed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from orchestrator.schema import ConfigError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """Which Ray cluster the run uses."""

    address: str | None = None
    """Existing cluster address (host:port or 'auto'); None starts an embedded one on loopback.
    The RAY_ADDRESS environment variable is used when this is None (Ray jobs set it)."""
    num_cpus: int | None = field(default=None, metadata={"ge": 1})
    """CPUs the embedded cluster offers (None: all of this machine's)."""
    dashboard: bool = False
    """Start the Ray dashboard (embedded cluster only; bound to 127.0.0.1). Needed for `ray job submit`
    and for the Prometheus export of the run's custom metrics."""
    dashboard_port: int = field(default=8265, metadata={"ge": 0, "le": 65535})
    """Dashboard port of the embedded cluster (0: any free port; a busy port moves to the next free one)."""


def loopback_env() -> dict[str, str]:
    """Environment variables that keep a single-node Ray cluster (and its clients) on 127.0.0.1 with
    token authentication: for `ray start --head` and `ray job submit` command lines as well.

        subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", ...],
                       env={**os.environ, **loopback_env()})
    """
    return {SINGLE_NODE_ENV: "0", AUTH_MODE_ENV: "token", "RAY_USAGE_STATS_ENABLED": "0"}


def is_loopback(address: str) -> bool:
    """True when a `host:port` (or bare host, or `[v6]:port`) names this machine's loopback interface."""
    host = address.split("://", 1)[-1]
    if host.startswith("["):
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keep_loopback() -> None:
    """Single-node mode for this process and every Ray process it starts (see the module docstring)."""
    os.environ[SINGLE_NODE_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        # Ray read the variable when it was imported; the driver's own copy must agree with its children.
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def _require_token_auth() -> None:
    mode = os.environ.get(AUTH_MODE_ENV, "token").lower()
    if mode != "token":
        raise ConfigError(
            f"{AUTH_MODE_ENV}={mode}: the embedded Ray cluster keeps token authentication on; "
            f"unset {AUTH_MODE_ENV} (the token lives in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH)"
        )
    # Unset is left to Ray: its new-cluster path turns token mode on in the environment *and* in the
    # driver's already-loaded C++ config; setting the variable here would skip the second half.


def start_local(
    num_cpus: int | None = None, *, dashboard: bool = False, dashboard_port: int = 8265, **kwargs: Any
) -> dict[str, Any]:
    """Start an embedded single-node Ray cluster that listens on 127.0.0.1 only; returns Ray's address
    info (`address`, `node_ip_address`, `webui_url`, `metrics_export_port`, `session_dir`, ...).

    Extra keyword arguments go to `ray.init` (e.g. `num_gpus`, `object_store_memory`).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _require_token_auth()
    _keep_loopback()
    import ray

    ctx = ray.init(
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host=LOOPBACK,
        dashboard_port=dashboard_port if dashboard else None,
        _node_ip_address=LOOPBACK,
        logging_level=logging.ERROR,
        log_to_driver=False,
        **kwargs,
    )
    info = dict(ctx.address_info)  # type: ignore[attr-defined]
    if info.get("node_ip_address") != LOOPBACK:  # a Ray upgrade changed the behaviour above
        ray.shutdown()
        raise RuntimeError(f"embedded Ray cluster came up on {info.get('node_ip_address')}, not {LOOPBACK}")
    return info


def join(address: str) -> dict[str, Any]:
    """Connect this process as a driver to a running cluster; returns Ray's address info.

    A loopback address (a `ray start --head --node-ip-address=127.0.0.1` on this machine) needs the same
    single-node mode as the embedded cluster, or Ray would dial the public interface instead.
    """
    if is_loopback(address):
        _keep_loopback()
    import ray

    try:
        ctx = ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        raise ConfigError(f"cluster.address: cannot reach a Ray cluster at {address}: {exc}") from None
    return dict(ctx.address_info)  # type: ignore[attr-defined]


def connect(cfg: ClusterConfig) -> dict[str, Any]:
    """Join `cfg.address` (or RAY_ADDRESS) when set, else start the embedded loopback cluster."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        return join(address)
    return start_local(cfg.num_cpus, dashboard=cfg.dashboard, dashboard_port=cfg.dashboard_port)


__all__ = ["ClusterConfig", "connect", "is_loopback", "join", "loopback_env", "start_local"]
