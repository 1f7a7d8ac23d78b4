"""One base class for every Ray actor that holds a device: rank, world size, device, torch.distributed.

Ray places each actor in its own process (with `CUDA_VISIBLE_DEVICES` narrowed to its GPU when it asked
for one), so the device is always `cuda:0` or the CPU. Ranks of one group rendezvous through a TCPStore
that rank 0 hosts on a loopback socket it bound itself (the store would otherwise listen on every
interface), and gloo is pinned to the loopback interface: nothing a learner opens is reachable from
another machine.

    ranks = [Learner.remote(rank=i, world_size=2) for i in range(2)]
    addr, port = ray.get(ranks[0].open_rendezvous.remote())
    ray.get([r.init_distributed.remote(addr, port) for r in ranks])
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

LOOPBACK = "127.0.0.1"


def default_device() -> torch.device:
    """The accelerator Ray gave this process, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class RankActor:
    """Sets rank, world size and device once; `init_distributed` joins the group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, rank: int = 0, world_size: int = 1, *, num_threads: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} is outside [0, {world_size})")
        self.rank = rank
        self.world_size = world_size
        self.device = default_device()
        if num_threads > 0:
            # Several CPU actors share a node: one intra-op pool each would oversubscribe its cores.
            torch.set_num_threads(num_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._listener: socket.socket | None = None
        self._store: torch.distributed.TCPStore | None = None

    def open_rendezvous(self) -> tuple[str, int]:
        """Rank 0 only: bind a free loopback port for the group's store; returns (address, port)."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: only rank 0 hosts the rendezvous")
        if self._listener is None:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.bind((LOOPBACK, 0))
            self._listener.listen(128)
        return LOOPBACK, int(self._listener.getsockname()[1])

    def init_distributed(self, address: str, port: int, timeout_s: float = 600.0) -> None:
        """Join the process group; every rank calls this concurrently. A second call is a no-op."""
        import torch.distributed as dist

        if dist.is_initialized():
            return
        timeout = datetime.timedelta(seconds=timeout_s)
        if address in (LOOPBACK, "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if self.rank == 0:
            if self._listener is None:
                raise RuntimeError("rank 0: call open_rendezvous() before init_distributed()")
            self._store = dist.TCPStore(
                address, port, self.world_size, is_master=True, timeout=timeout,
                wait_for_workers=False, master_listen_fd=self._listener.fileno(),
            )  # fmt: skip
        else:
            self._store = dist.TCPStore(address, port, self.world_size, is_master=False, timeout=timeout)
        # GPU: NCCL for tensors, gloo kept for the CPU-side objects checkpointing exchanges.
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=self._store, rank=self.rank, world_size=self.world_size, timeout=timeout
        )

    def pid(self) -> int:
        """The actor's process id (tests kill it to simulate a lost rank)."""
        return os.getpid()

    def shutdown(self) -> None:
        """Leave the process group (safe to call twice)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


__all__ = ["LOOPBACK", "RankActor", "default_device"]
