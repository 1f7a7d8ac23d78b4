"""The embedded Ray cluster listens on loopback only, and keeps token authentication on."""

from __future__ import annotations

import ipaddress
from typing import Any

import psutil
import pytest

from orchestrator.cluster import is_loopback, start_local
from orchestrator.schema import ConfigError


def ray_processes(session_dir: str) -> list[psutil.Process]:
    """Every process of one Ray session: those naming its session dir, and all their descendants
    (core workers are children of the raylet)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in arg for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def bound_sockets(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket and bound UDP socket of `procs`."""
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:  # exited meanwhile
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)  # 2: SOCK_DGRAM
            if listening and c.laddr:
                out.append((name, c.laddr.ip, c.laddr.port))
    return out


def loopback_ip(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, how a dual-stack socket reports an IPv4 bind
    return addr.is_loopback


@pytest.mark.ray
def test_embedded_cluster_listens_on_loopback_only(ray_cluster: dict[str, Any]) -> None:
    import ray

    assert ray_cluster["node_ip_address"] == "127.0.0.1"
    assert ray_cluster["address"].startswith("127.0.0.1:")
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}

    @ray.remote(num_cpus=0)
    class Probe:
        def ip(self) -> str:
            return ray.util.get_node_ip_address()

    probe = Probe.remote()  # type: ignore[attr-defined]  # a live core worker: its gRPC server must be on loopback too
    assert ray.get(probe.ip.remote(), timeout=60) == "127.0.0.1"
    procs = ray_processes(ray_cluster["session_dir"])
    names = {p.name() for p in procs if p.is_running()}
    assert {"gcs_server", "raylet"} <= names, names
    sockets = bound_sockets(procs)
    assert len(sockets) >= 4, sockets  # gcs, raylet (node manager + object manager), core workers...
    exposed = [s for s in sockets if not loopback_ip(s[1])]
    assert not exposed, f"Ray sockets outside loopback: {exposed}"
    ray.kill(probe)


@pytest.mark.ray
def test_embedded_cluster_refuses_to_switch_token_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=disabled"):
        start_local(num_cpus=1)  # refused before Ray is touched


def test_is_loopback() -> None:
    for address in ("127.0.0.1:6379", "localhost:1", "[::1]:8265", "http://127.0.0.1:8265", "127.0.0.2"):
        assert is_loopback(address), address
    for address in ("192.0.2.2:6379", "auto", "head.example:6379", "[2001:db8::1]:1", "0.0.0.0:1"):
        assert not is_loopback(address), address
