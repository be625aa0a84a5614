"""The checkpoint store as its own failure domain (`--runtime ray`): a Ray actor process holds
the memory tier and writes the Orbax files, so a block is committed once that process has it,
and survives whatever happens to the attention worker that sent it (paper 2.4: the store is
elsewhere). The Orbax writes also leave the driver: their Python no longer competes with the
decode loop for the GIL.

`RemoteCheckpointStore` is the driver's side, with CheckpointStore's interface. snapshot() only
queues: a sender thread waits for the device->host copy (GIL released) and ships the blocks with
one actor call, in order with drop(). An AW that dies takes its unsent snapshots with it
(abandon). A dead or unreachable store process is a lost tier, not a failed service: snapshots
go nowhere, and restores raise StoreUnavailable (a SnapshotMissing), so moved requests recompute from their tokens.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time

import numpy as np

from tarragon_jax.kv.checkpoint_store import (BlockRef, CheckpointStore, StoreUnavailable, check_snapshot,
                                              start_host_copy)

log = logging.getLogger(__name__)
STARTUP_DEADLINE_S = 120.0       # the actor process imports orbax (and jax)
SETTLE_EVERY = 64                # snapshot calls in flight before the sender collects the answered ones

PING_EVERY_S = 1.0   # the heartbeat pings the store's process at most this often (a Ray call each:
                     # every tick, it cost an idle server ~1.7% of a core in the store alone)


def where() -> dict:
    """The calling process's pid and Ray node (IP and id: nodes of one machine share an IP)."""
    import ray
    return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id()}


class StoreActor:
    """Runs inside the store's process: one CheckpointStore (memory tier + Orbax files)."""

    def __init__(self, directory: str | None, memory_tier: bool, flush_interval_s: float | None):
        self.store = CheckpointStore(directory, memory_tier=memory_tier, flush_interval_s=flush_interval_s)

    def info(self) -> dict:
        return {**where(), "devices": ["host memory + Orbax files (ray actor)"], "directory": str(self.store.directory)}

    def ping(self) -> bool:
        return True

    def call(self, name: str, *args):
        """A CheckpointStore method or property, by name."""
        got = getattr(self.store, name)
        return got(*args) if callable(got) else got


class RemoteCheckpointStore:
    """CheckpointStore's interface over a StoreActor (the driver's side)."""

    def __init__(self, actor, *, memory_tier: bool, deadline_s: float, owner: bool = False):
        """A client of the store process `actor` (a StoreActor handle: the driver starts one,
        every AW process attaches to it); only the owner stops it on close()."""
        self.actor, self.memory_tier, self.deadline_s, self.owner = actor, memory_tier, deadline_s, owner
        try:
            self.where = self._get(self.actor.info.remote(), STARTUP_DEADLINE_S if owner else deadline_s)
        except StoreUnavailable:
            if owner:
                raise
            self.where = {"directory": None}  # attaching to a store that died: a lost tier until the
                                              # controller attaches a new one (attach_store)
        self.directory = self.where["directory"]
        self._ping: tuple | None = None       # (ref, sent at) of the heartbeat's ping in flight
        self._answered = 0.0                   # when the last ping was answered
        self._queue: collections.deque = collections.deque()     # ("snap", aw, refs, blocks) | ("drop", rid)
        self._cv = threading.Condition()
        self._busy = 0                    # items taken by the sender, not yet handed to the actor
        self._sent: list = []             # refs of snapshot calls since the last wait()
        self._errors: list[str] = []
        self._closed = False
        self._final: dict | None = None   # the store's last stats and errors, once closed
        self._thread = threading.Thread(target=self._send, name="kv-store-sender", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, directory: str | None, *, memory_tier: bool, flush_interval_s: float | None,
              deadline_s: float, options: dict | None = None) -> "RemoteCheckpointStore":
        """Start the store's process (options: Ray actor options, e.g. its scheduling strategy)."""
        import ray
        actor = ray.remote(num_cpus=0, max_restarts=0)(StoreActor).options(**(options or {})).remote(
            directory, memory_tier, flush_interval_s)
        return cls(actor, memory_tier=memory_tier, deadline_s=deadline_s, owner=True)

    def identity(self) -> dict:
        return {k: v for k, v in self.where.items() if k != "directory"}

    def local(self) -> bool:
        """Does the store's process run on this machine (its pid means something here)?"""
        import ray
        return self.where.get("node") == ray.util.get_node_ip_address()

    def check(self, bound_s: float) -> str | None:
        """The heartbeat's look at the store's process, never waiting: a reason once it is found
        dead or has left a ping unanswered for `bound_s`, else None (a ping goes out, or the
        one in flight is looked at)."""
        import ray
        if self._ping is None:
            if time.monotonic() - self._answered < PING_EVERY_S:
                return None
            self._ping = (self.actor.ping.remote(), time.monotonic())
            return None
        ref, sent = self._ping
        if ray.wait([ref], timeout=0)[0]:
            self._ping, self._answered = None, time.monotonic()
            try:
                ray.get(ref, timeout=0)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
                return f"process gone ({type(e).__name__})"
            return None
        return f"no answer to a ping within {bound_s:g} s" if time.monotonic() - sent > bound_s else None

    def detach(self) -> None:
        """This client is done with a store that died: what is queued for it is dropped."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()

    def fence(self) -> None:
        """The store's process is dead or hung: stop it (Ray kills it wherever it runs), drop what
        is queued for it, never wait."""
        import ray
        self.detach()
        pid = self.where.get("pid") if self.local() else None

        def kill():
            if pid:                      # this host's: a SIGKILL lands at once, SIGSTOPped or not
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        threading.Thread(target=kill, name="fence-store", daemon=True).start()

    # ---- the engine's side ---------------------------------------------------------------------
    def snapshot(self, aw: int, refs: list[BlockRef], blocks, sums=None) -> None:
        check_snapshot(refs, tuple(blocks.shape))
        if not refs:
            return
        start_host_copy(blocks, sums)
        self._put(("snap", aw, list(refs), blocks, sums))

    def link(self, aw: int, refs: list[BlockRef]) -> None:
        if refs:
            self._put(("link", aw, list(refs)))

    def drop(self, request_id: int) -> None:
        self._put(("drop", request_id))

    def abandon(self, aw: int) -> None:
        """AW `aw` died: what it had not shipped is lost (what the store process holds stays)."""
        with self._cv:
            kept = [item for item in self._queue if not (item[0] == "snap" and item[1] == aw)]
            self._queue.clear()
            self._queue.extend(kept)

    def restore(self, request_id: int, num_blocks: int | None = None) -> np.ndarray:
        return self._call("restore", request_id, num_blocks)

    def restore_prefix(self, hashes: list[int]) -> np.ndarray:
        return self._call("restore_prefix", list(hashes))

    def committed_blocks(self, request_id: int) -> int:
        return self._call("committed_blocks", request_id)

    def committed_tokens(self, request_id: int, page_size: int) -> int:
        return self.committed_blocks(request_id) * page_size

    def requests(self) -> list[int]:
        return self._call("requests")

    def drop_memory_tier(self) -> None:
        self._call("drop_memory_tier")

    def wait(self, timeout: float | None = None) -> None:
        """Every queued snapshot shipped and written (the store's own wait)."""
        self._shipped(timeout)
        with self._cv:
            sent, self._sent = self._sent, []
        for ref in sent:
            self._get(ref, timeout)
        self._call("wait", timeout, deadline_s=timeout)

    @property
    def errors(self) -> list[str]:
        return self._errors + (self._final["errors"] if self._final else self._call("errors"))

    @property
    def stats(self) -> dict:
        """The store's counters (after close(): its last ones, as a local store keeps them)."""
        return self._final["stats"] if self._final else self._call("stats")

    def close(self) -> None:
        """Ship what is queued; the owner also lets the store finish its writes and stops its process."""
        import ray
        if self._closed:
            return
        try:
            self.wait(self.deadline_s) if self.owner else self._shipped(self.deadline_s)
            if self.owner:
                self._call("close")
                self._final = {"stats": self._call("stats"), "errors": self._call("errors")}
        except (StoreUnavailable, TimeoutError) as e:
            log.warning("checkpoint store did not close cleanly: %s", e)
        self._closed = True
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=5)
        if self.owner:
            ray.kill(self.actor)

    # ---- internals -----------------------------------------------------------------------------
    def _put(self, item: tuple) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("snapshot() on a closed CheckpointStore")
            self._queue.append(item)
            self._cv.notify_all()

    def _send(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy += 1
            try:
                if item[0] in ("drop", "link"):
                    self.actor.call.remote(*item)
                else:
                    _, aw, refs, blocks, sums = item
                    if hasattr(blocks, "block_until_ready"):
                        blocks.block_until_ready()          # the GIL is released while it lands
                    n = len(refs)
                    ref = self.actor.call.remote("snapshot", aw, refs, np.asarray(blocks)[:n],
                                                 None if sums is None else np.asarray(sums)[:n])
                    with self._cv:
                        self._sent.append(ref)
                    if len(self._sent) >= SETTLE_EVERY:
                        self._settle()
            except Exception as e:      # noqa: BLE001 -- a snapshot lost is a recompute later, never a stop
                self._errors.append(f"{item[0]} {item[1]}: {type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def _settle(self) -> None:
        """Collect the snapshot calls already answered (their errors surface), keep the rest."""
        import ray
        with self._cv:
            sent = list(self._sent)
        done, _ = ray.wait(sent, num_returns=len(sent), timeout=0)
        for ref in done:
            try:
                self._get(ref, 0)
            except Exception as e:  # noqa: BLE001 -- recorded: the blocks stay uncommitted
                self._errors.append(f"snapshot: {type(e).__name__}: {e}")
        done = set(done)
        with self._cv:
            self._sent = [r for r in self._sent if r not in done]

    def _shipped(self, timeout: float | None) -> None:
        """Until everything queued before now went to the store's process (a call made after
        this sees it, as calls from one process to an actor run in order)."""
        with self._cv:
            if not self._cv.wait_for(lambda: not self._queue and not self._busy, timeout):
                raise TimeoutError(f"{len(self._queue)} snapshots not yet shipped after {timeout} s")

    def _call(self, name: str, *args, deadline_s: float | None = None):
        """A call to the store that sees every snapshot and drop made before it."""
        deadline_s = deadline_s or self.deadline_s
        self._shipped(deadline_s)
        return self._get(self.actor.call.remote(name, *args), deadline_s)

    def _get(self, ref, deadline_s: float | None):
        """The answer within the deadline; the store's own errors (SnapshotMissing, ...) as they
        were raised; a dead or silent store process as SnapshotMissing."""
        import ray
        try:
            return ray.get(ref, timeout=deadline_s)
        except ray.exceptions.RayTaskError as e:
            raise e.cause from None
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            detail = " ".join(str(e).split())[:200]
            raise StoreUnavailable(f"checkpoint store process unavailable ({type(e).__name__}: {detail})") from None
