"""Versioned weight sync from the learner to the generators: Ray's object store, or a collective broadcast.

Object store (CPU, any cluster): the snapshot is `ray.put` once and the same ObjectRef goes to every
generator's `load_weights`. In a run, learner rank 0 puts it itself (`Learner.publish_for_rollout`) and
the controller only passes the ref on (`adopt`): the weights never travel through the driver. Ray
pickles torch tensors by copying their storage (~0.3 GB/s here); `pack` (actors/records.py) makes each
tensor travel as a raw uint8 buffer instead, mapped zero-copy by the reader (~2-10 GB/s, bench/sync.py).

    sync = WeightSync()
    published = sync.adopt(learners.publish_for_rollout())      # a ref put by rank 0, version checked
    stats = sync.deliver(generator_handles, published)           # every generator answers its version
    sync.publish(snapshot)                                       # or put a snapshot from this process

Collective (GPU: NCCL; CPU: gloo, which the tests use; a run's `resources.weight_sync: collective`):
learner rank 0 and the generators form their own process group and rank 0 broadcasts (the transport and
the actors' `WeightEndpoint` mixin are in orchestrator/weight_channel.py; this is the controller's side).
A process group cannot take in a restarted process, so the run forms a new group when
any member restarted (`connected` is False); `Roles.sync_weights` owns that and the failure handling. A
group's rendezvous waits `rendezvous_s` for its members, its broadcasts `timeout_s`: a member that dies
as the group forms costs the short wait, then the group is formed again.

    sync = WeightSync(backend="nccl")
    if not sync.connected(learner_rank0, generator_handles):
        sync.connect(source=learner_rank0, receivers=generator_handles)
    stats = sync.broadcast(send=learners.broadcast_for_rollout)  # every FSDP rank gathers, rank 0 sends

Versions: `publish` refuses a version older than the last one (a restore passes `rewind=True`), and a
sync succeeds only when every generator reports the published version. Generator actors run one call at a
time, and the controller starts sampling only after the sync returned, so a group is never sampled with
two versions; a generator that restarted meanwhile holds another version and its `generate` refuses the
request (actors/generator.py StaleWeights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from actors.records import Published, WeightSnapshot, pack, state_nbytes
from orchestrator.weight_channel import WeightSyncError

Backend = Literal["object_store", "nccl", "gloo"]


class BroadcastFailed(WeightSyncError):
    """A collective sync that failed on either side. `unfinished`: receivers (by index) that returned no
    version, dead or perhaps still waiting inside the broadcast; `dead`: those whose process died."""

    def __init__(self, cause: BaseException, unfinished: list[int], dead: list[int]) -> None:
        super().__init__(
            f"broadcast failed ({type(cause).__name__}: {cause}); receivers {unfinished} unfinished, {dead} dead"
        )
        self.cause, self.unfinished, self.dead = cause, unfinished, dead


def put_snapshot(snapshot: WeightSnapshot) -> Published:
    """The snapshot in Ray's object store as raw buffers (`pack`, read without copies), with its version,
    size and how long the put took."""
    import ray

    t0 = time.perf_counter()
    ref = ray.put(pack(snapshot))
    return Published(
        version=snapshot.policy_version, ref=ref, nbytes=state_nbytes(snapshot.state),
        put_s=time.perf_counter() - t0,
    )  # fmt: skip


@dataclass(kw_only=True, slots=True)
class SyncStats:
    version: int
    nbytes: int
    seconds: float
    """Wall time of the whole sync: put (or send) until every generator confirmed its version."""

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------------------- controller
class WeightSync:
    """The controller's side of weight sync, for either backend."""

    def __init__(
        self, backend: Backend = "object_store", *, timeout_s: float = 600.0, rendezvous_s: float = 30.0
    ) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.rendezvous_s = rendezvous_s
        self.published: Published | None = None
        self.last_version = -1
        self._source: Any = None
        self._receivers: list[Any] = []
        self._group_id: str | None = None

    def _check_version(self, version: int, rewind: bool) -> None:
        if version < self.last_version and not rewind:
            raise WeightSyncError(
                f"policy version went back from {self.last_version} to {version} (pass rewind=True after a restore)"
            )

    def adopt(self, published: Published, *, rewind: bool = False) -> Published:
        """Take a snapshot another process put (learner rank 0's `publish_for_rollout`), version checked;
        the previous one is released."""
        self._check_version(published.version, rewind)
        self.published, self.last_version = published, published.version
        return published

    def publish(self, snapshot: WeightSnapshot, *, rewind: bool = False) -> Published:
        """Put the (packed) snapshot into the object store once; the previous one is released."""
        self._check_version(snapshot.policy_version, rewind)
        self.published = put_snapshot(snapshot)
        self.last_version = snapshot.policy_version
        return self.published

    def deliver(
        self, receivers: Sequence[Any], published: Published | None = None, method: str = "load_weights"
    ) -> SyncStats:
        """Hand the ref to every receiver's `method` and wait until each reports the published version."""
        import ray

        pub = published or self.published
        if pub is None:
            raise WeightSyncError("deliver before publish")
        t0 = time.perf_counter()
        got = ray.get([getattr(h, method).remote(pub.ref) for h in receivers], timeout=self.timeout_s)
        _expect(got, pub.version)
        return SyncStats(version=pub.version, nbytes=pub.nbytes, seconds=pub.put_s + time.perf_counter() - t0)

    def connect(self, source: Any, receivers: Sequence[Any]) -> None:
        """Form the broadcast group: source is rank 0, receivers 1..n (all `WeightEndpoint` actors). Called
        again after a member restarted, every member joins a new group (a process group cannot take in a
        new process)."""
        import ray

        if self.backend == "object_store":
            raise WeightSyncError("connect is for the nccl/gloo backends")
        members = [source, *receivers]
        # Every member must answer first: one that is restarting would fail its join at once and leave the
        # others waiting in the rendezvous until the timeout.
        ray.get([m.weights_group.remote() for m in members], timeout=self.timeout_s)
        address, port = ray.get(source.weights_listen.remote(), timeout=self.timeout_s)
        self._join(members, address, port)
        self._source, self._receivers = source, list(receivers)
        self._group_id = f"{address}:{port}"

    def _join(self, members: list[Any], address: str, port: int) -> None:
        """Every member joins the group at address:port. A receiver that died after the liveness check
        leaves the others in the rendezvous until `rendezvous_s`: BroadcastFailed then names it, and the
        caller forms a new group with its restarted process, as after a failed broadcast."""
        import ray

        refs = [
            m.weights_join.remote(
                r, len(members), address, port, self.backend, self.timeout_s, self.rendezvous_s
            )
            for r, m in enumerate(members)
        ]
        try:
            ray.get(refs, timeout=self.timeout_s)
        except Exception as exc:
            # the others leave the rendezvous within rendezvous_s (their failed joins need no restart);
            # one still in it after that is stuck
            stuck, dead = _unfinished(refs[1:], grace_s=self.rendezvous_s + 2.0, count_failed=False)
            if not dead:  # the source failed, or a join failed for another reason: not retried here
                raise
            raise BroadcastFailed(exc, stuck, dead) from exc

    def connected(self, source: Any, receivers: Sequence[Any]) -> bool:
        """Whether these very members (none restarted since) form the current group."""
        import ray

        if self._source is None or self._group_id is None:
            return False
        members = [source, *receivers]
        if [m._actor_id for m in members] != [m._actor_id for m in [self._source, *self._receivers]]:
            return False
        groups = ray.get([m.weights_group.remote() for m in members], timeout=self.timeout_s)
        return all(g == self._group_id for g in groups)

    def broadcast(
        self, *, rewind: bool = False, send: Callable[[], tuple[int, int] | None] | None = None
    ) -> SyncStats:
        """One collective sync of the source's current snapshot to every receiver. `send` runs the source's
        side when more than the source takes part (every FSDP rank gathers, rank 0 sends); it returns
        (version, bytes). The receivers' calls go out first: each waits in the broadcast for the source."""
        import ray

        if self._source is None:
            raise WeightSyncError("broadcast before connect")
        t0 = time.perf_counter()
        got_refs = [r.weights_recv.remote() for r in self._receivers]
        try:
            sent = (
                ray.get(self._source.weights_send.remote(), timeout=self.timeout_s)
                if send is None
                else send()
            )
            if sent is None:
                raise WeightSyncError("the source took no snapshot (weights_snapshot returned None)")
            version, nbytes = sent
            got = ray.get(got_refs, timeout=self.timeout_s)
        except Exception as exc:
            raise BroadcastFailed(exc, *_unfinished(got_refs)) from exc
        self._check_version(version, rewind)
        _expect(got, version)
        self.last_version = version
        return SyncStats(version=version, nbytes=nbytes, seconds=time.perf_counter() - t0)

    def disconnect(self) -> None:
        """Forget the group (after a failed broadcast): the next sync forms a new one."""
        self._source, self._receivers, self._group_id = None, [], None


def _unfinished(
    refs: list[Any], grace_s: float = 2.0, *, count_failed: bool = True
) -> tuple[list[int], list[int]]:
    """Which receivers' calls gave no version (after `grace_s` for the rest to finish), and which died.
    `count_failed=False` leaves out calls that returned an error other than their actor's death."""
    import ray
    from ray.exceptions import RayActorError

    done, _ = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    unfinished, dead = [], []
    for i, ref in enumerate(refs):
        if ref not in done:
            unfinished.append(i)
            continue
        try:
            ray.get(ref)
        except RayActorError:
            unfinished.append(i)
            dead.append(i)
        except Exception:
            if count_failed:
                unfinished.append(i)
    return unfinished, dead


def _expect(got: list[int], version: int) -> None:
    wrong = {i: v for i, v in enumerate(got) if v != version}
    if wrong:
        raise WeightSyncError(
            f"generators {sorted(wrong)} report versions {list(wrong.values())}, expected {version}"
        )


__all__ = [
    "BroadcastFailed",
    "Published",
    "SyncStats",
    "WeightSync",
    "WeightSyncError",
    "pack",
    "put_snapshot",
    "state_nbytes",
]
