"""The collective transport of weight sync: one process group of learner rank 0 (the source) and the
generators, separate from the learner's FSDP group. Rank 0 broadcasts a header, the tensors' names,
dtypes and shapes (JSON, no pickle) and dtype-bucketed flat buffers; NCCL between GPUs, gloo between CPU
processes (which the tests use).

Actors take part by mixing in `WeightEndpoint`; the controller's side, which forms the group and
handles failures, is `WeightSync` in orchestrator/weight_sync.py. A group's rendezvous waits
`rendezvous_s` for its members and its broadcasts `timeout_s`, so a member that dies as the group forms
costs only the short wait.

    channel = WeightChannel.join(rank=r, world=n, address=a, port=p, backend="gloo", bind_host=h,
                                 listener=sock if r == 0 else None)
    channel.send(snapshot)       # rank 0
    snapshot = channel.recv()    # every other rank
"""

from __future__ import annotations

import datetime
import json
import socket
from typing import Any, Literal

import numpy as np
import torch

from actors.records import WeightSnapshot, state_nbytes

BUCKET_BYTES = 256 * 2**20


class WeightSyncError(RuntimeError):
    """A sync that could not guarantee every generator holds the published version."""


def _buckets(meta: list[tuple[str, str, list[int]]], bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensors of one dtype, up to bucket_bytes each (one broadcast per bucket); both ends
    compute the same split from the same header."""
    out: list[list[int]] = []
    size, dtype = 0, ""
    for i, (_, dt, shape) in enumerate(meta):
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=getattr(torch, dt)).element_size()
        if not out or dt != dtype or size + nbytes > bucket_bytes:
            out.append([])
            size, dtype = 0, dt
        out[-1].append(i)
        size += nbytes
    return out


class WeightChannel:
    """One member of a broadcast group: rank 0 sends snapshots, every other rank receives them."""

    def __init__(
        self, group: Any, rank: int, device: torch.device, store: Any, timeout: datetime.timedelta
    ) -> None:
        self.group, self.rank, self.device, self._store = group, rank, device, store
        self.timeout = timeout
        """Of each broadcast (the group's own default is the shorter rendezvous timeout)."""

    @staticmethod
    def listen(host: str) -> socket.socket:
        """Rank 0: a listening socket for the group's store, on this node's address (loopback when the
        cluster is), port 0."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.listen(128)
        return sock

    @classmethod
    def join(
        cls,
        *,
        rank: int,
        world: int,
        address: str,
        port: int,
        backend: Literal["nccl", "gloo"],
        bind_host: str,
        listener: socket.socket | None = None,
        timeout_s: float = 600.0,
        rendezvous_s: float = 30.0,
    ) -> WeightChannel:
        """Every member calls this concurrently (the group's constructor is a rendezvous). With gloo it
        fails after `rendezvous_s` when a member never comes (one that died after the controller saw it
        alive); the broadcasts themselves wait up to `timeout_s`. With NCCL nobody waits here (a member
        that never comes fails the first broadcast instead)."""
        import torch.distributed as dist

        # gloo's constructor is the rendezvous and waits with the group's own timeout (and the store's),
        # so both get the short one and each broadcast passes the long one. NCCL's constructor waits for
        # nobody: its communicator is made in the first broadcast, where the receivers wait in the store
        # while rank 0 still gathers the weights (long at 1.6B), so there the store keeps the long one.
        timeout = datetime.timedelta(seconds=timeout_s)
        rendezvous = (
            datetime.timedelta(seconds=min(rendezvous_s, timeout_s)) if backend == "gloo" else timeout
        )
        if rank == 0:
            if listener is None:
                raise ValueError("rank 0 hosts the store: pass the socket from WeightChannel.listen")
            store = dist.TCPStore(
                address, port, world, is_master=True, timeout=rendezvous, wait_for_workers=False,
                master_listen_fd=listener.fileno(),
            )  # fmt: skip
        else:
            store = dist.TCPStore(address, port, world, is_master=False, timeout=rendezvous)
        prefixed = dist.PrefixStore("sana-rl-weights", store)
        group: Any
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            group = dist.ProcessGroupNCCL(prefixed, rank, world, opts)
        else:
            device = torch.device("cpu")
            gloo = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            gloo._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
            gloo._timeout = rendezvous
            group = dist.ProcessGroupGloo(prefixed, rank, world, gloo)
        return cls(group, rank, device, store, timeout)

    def _bcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        self.group.broadcast([tensor], opts).wait()

    def send(self, snapshot: WeightSnapshot, bucket_bytes: int = BUCKET_BYTES) -> int:
        """Rank 0: header, names/dtypes/shapes (JSON bytes, no pickle), then the buckets. Returns bytes."""
        state = snapshot.state
        meta = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in state.items()]
        blob = torch.frombuffer(
            bytearray(json.dumps({"tensors": meta, "bucket": bucket_bytes}).encode()), dtype=torch.uint8
        )
        self._bcast(
            torch.tensor([snapshot.policy_version, blob.numel()], dtype=torch.int64, device=self.device)
        )
        self._bcast(blob.to(self.device))
        tensors = list(state.values())
        for bucket in _buckets(meta, bucket_bytes):
            flat = torch.cat([tensors[i].detach().reshape(-1).to(self.device) for i in bucket])
            self._bcast(flat)
        return state_nbytes(state)

    def recv(self) -> WeightSnapshot:
        """Any other rank: the snapshot rank 0 sends (tensors are views of per-bucket buffers on this
        member's device)."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._bcast(header)
        version, length = (int(x) for x in header.tolist())
        blob = torch.empty(length, dtype=torch.uint8, device=self.device)
        self._bcast(blob)
        spec = json.loads(bytes(blob.cpu().numpy()).decode())
        meta = [(n, dt, shape) for n, dt, shape in spec["tensors"]]
        state: dict[str, torch.Tensor] = {}
        for bucket in _buckets(meta, int(spec["bucket"])):
            dtype = getattr(torch, meta[bucket[0]][1])
            sizes = [int(np.prod(meta[i][2], dtype=np.int64)) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
            self._bcast(flat)
            for i, part in zip(bucket, flat.split(sizes), strict=True):
                state[meta[i][0]] = part.view(meta[i][2])
        return WeightSnapshot(policy_version=version, state=state)

    def close(self) -> None:
        self.group = None
        self._store = None


class WeightEndpoint:
    """Mixin for Ray actors taking part in the collective path. The source (learner rank 0) implements
    `weights_snapshot() -> WeightSnapshot`; receivers (generators) implement `load_weights(snapshot) -> int`.
    A restarted actor is in no group (`weights_group()` is None) until the controller forms a new one.
    """

    _weights_listeners: list[socket.socket] | None = None
    _weights_channel: WeightChannel | None = None
    _weights_group_id: str | None = None
    weights_bucket_bytes: int = BUCKET_BYTES
    weights_last_sent: WeightSnapshot | None = None
    """The source's last broadcast snapshot, as `weights_snapshot` returned it (for a receiver that
    restarted after it)."""

    def weights_listen(self) -> tuple[str, int]:
        """Source only: open a new group's rendezvous on this node's address; returns (address, port).
        Earlier listeners stay open: a store that was built on one keeps using its socket."""
        import ray

        host = ray.util.get_node_ip_address()
        listener = WeightChannel.listen(host)
        self._weights_listeners = [*(self._weights_listeners or []), listener]
        return host, int(listener.getsockname()[1])

    def weights_join(
        self,
        rank: int,
        world: int,
        address: str,
        port: int,
        backend: Literal["nccl", "gloo"],
        timeout_s: float,
        rendezvous_s: float = 30.0,
    ) -> None:
        import os

        import ray

        host = ray.util.get_node_ip_address()
        if backend == "nccl" and host.startswith("127."):
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # keep NCCL's bootstrap on loopback too
        listener = self._weights_listeners[-1] if rank == 0 and self._weights_listeners else None
        self._weights_channel = WeightChannel.join(
            rank=rank, world=world, address=address, port=port, backend=backend, bind_host=host,
            listener=listener, timeout_s=timeout_s, rendezvous_s=rendezvous_s,
        )  # fmt: skip
        self._weights_group_id = f"{address}:{port}"

    def weights_group(self) -> str | None:
        """The group this actor is a member of (its rendezvous address), None before any join."""
        return self._weights_group_id

    def weights_send(self) -> tuple[int, int] | None:
        """Source: broadcast the current snapshot and keep it (`weights_last_sent`); returns (version,
        bytes). Where taking the snapshot is itself collective (FSDP ranks gather to rank 0) every rank
        calls this, and the ranks that get no snapshot (None) return None."""
        snapshot: WeightSnapshot | None = self.weights_snapshot()  # type: ignore[attr-defined]
        if snapshot is None:
            return None
        if self._weights_channel is None:
            raise WeightSyncError("weights_send before weights_join")
        nbytes = self._weights_channel.send(snapshot, self.weights_bucket_bytes)
        self.weights_last_sent = snapshot
        return snapshot.policy_version, nbytes

    def weights_recv(self) -> int:
        """Receiver: take the broadcast snapshot and load it; returns the version now held."""
        if self._weights_channel is None:
            raise WeightSyncError("weights_recv before weights_join")
        return int(self.load_weights(self._weights_channel.recv()))  # type: ignore[attr-defined]


__all__ = ["BUCKET_BYTES", "WeightChannel", "WeightEndpoint", "WeightSyncError"]
