"""Starting or joining the Ray cluster a run uses, on loopback unless a cluster address is given."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """Which Ray cluster the run uses."""

    address: str | None = None
    """Existing cluster address (host:port or 'auto'); None starts an embedded one on loopback."""
    num_cpus: int | None = field(default=None, metadata={"ge": 1})
    """CPUs the embedded cluster offers (None: all of this machine's)."""
    dashboard: bool = False
    """Start the Ray dashboard (embedded cluster only; bound to 127.0.0.1)."""
    dashboard_port: int = field(default=8265, metadata={"ge": 0, "le": 65535})


def start_local(num_cpus: int | None = None, *, dashboard: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Start an embedded single-node Ray cluster bound to loopback; returns ray's address info."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_NODE_IP_ADDRESS", "127.0.0.1")
    ctx = ray.init(
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        log_to_driver=False,
        **kwargs,
    )
    return dict(ctx.address_info)
