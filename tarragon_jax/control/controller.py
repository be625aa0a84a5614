"""Controller: health events -> recovery actions, and the workers it owns.

Control only: it never touches tokens. It builds the workers, turns failures reported by the
datapath (failed calls, missed deadlines) or its own heartbeats into new routing-table versions,
request moves and replacement workers, and runs the restart baseline. Policy lives in
placement.py / recovery.py, detection in health.py, mechanism in the workers.

EW failure (tarragon): the ERT is derived again without the failed EW (shadows take over);
experts left with no replica are loaded from host memory onto a live EW before the ERT is
published; a replacement EW is built on a spare device in a background thread (weights, compile)
and joins at a step boundary with a newer ERT. AW failure: its live requests move round-robin to
healthy AWs, which restore committed KV blocks from the checkpoint store; a replacement AW is
built in the background and takes new requests once ready.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Callable

import jax

from tarragon_jax.config import CacheConfig, ConfigError, EngineConfig, ModelConfig
from tarragon_jax.control.health import HealthMonitor
from tarragon_jax.control.placement import Placement, place
from tarragon_jax.control.prefix_router import PrefixRouter
from tarragon_jax.control.rebalancer import Rebalancer
from tarragon_jax.control.recovery import RecoveryError, plan_aw_failure, plan_expert_routing
from tarragon_jax.errors import WorkerFailed
from tarragon_jax.kv.prefix_hash import cache_salt
from tarragon_jax.model.weights import Weights, as_weights
from tarragon_jax.workers.attention_worker import AttentionWorker
from tarragon_jax.workers.expert_worker import ExpertWorker
from tarragon_jax.workers.grammar import Vocabulary
from tarragon_jax.workers.attention_process import RemoteAttentionWorker
from tarragon_jax.workers.expert_process import RemoteExpertWorker
from tarragon_jax.workers.interfaces import AttentionWorkerAPI, ExpertWorkerAPI
from tarragon_jax.workers.ray_runtime import RayRuntime
from tarragon_jax.workers.remote_worker import RemoteHandle, RemoteWorker
from tarragon_jax.workers.rpc import RemoteError
from tarragon_jax.workers.routing_table import RoutingTable
from tarragon_jax.workers.local_runtime import LocalRuntime
from tarragon_jax.workers.runtime import PROBE_TIMEOUT_S, WorkerHandle
from tarragon_jax.workers.sequence import Sequence
from tarragon_jax.workers.shape_grid import ShapeGrid, recovery_grid, shape_grid

GRIDS = {"recovery": recovery_grid, "all": shape_grid}     # --precompile: what startup compiles

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Job:
    """A replacement being built in the background (future), or waiting to be retried."""
    build: Callable[[], object]
    join: Callable[[object], None]
    rec: "RecoveryRecord"
    future: concurrent.futures.Future | None = None
    retry_at: float = 0.0


@dataclasses.dataclass
class RecoveryRecord:
    """One failure, as the benchmark's breakdown reports it (seconds; None = not applicable)."""
    worker: str
    kind: str                            # "ew" | "aw" | "store"
    detected_by: str
    detect_s: float | None               # injection -> detection
    reroute_s: float = 0.0               # new ERT published (incl. host loads of orphaned experts)
    orphans_loaded: int = 0
    requests_moved: int = 0
    replacement_ready_s: float | None = None   # detection -> replacement worker joined (weights + compile)
    recompile_s: float | None = None     # of which: compiling the failed worker's programs for the new mesh
    restart_s: float | None = None       # restart baseline: teardown + weight reload + rebuild
    tokens_recomputed: int = 0           # restart baseline: every cached position of every request
    replacement_attempts: int = 0        # builds of a replacement started (a failed one is retried with backoff)
    replacement_error: str | None = None # the last failed build's error (the worker is down until one joins)
    process: dict | None = None          # the failed worker's pid, node and devices (WorkerHandle.identity)


RETRY_S = (1.0, 30.0)   # a failed replacement build is retried after 1 s, 2 s, 4 s ... at most 30 s
STORE_PING_S = 5.0      # the checkpoint store's process is fenced and replaced when a ping waits this long
                        # (a hung store costs no step: restores fall back to recompute meanwhile)
REPLACEMENT_WAIT_S = 180.0   # with every AW (or EW) down, how long the engine waits for one to join
REMOTE_PROBE_S = 1.0    # a silent worker process is pinged at most this often: its death closes its
                        # channel (seen at every heartbeat tick, for free), so a ping only finds a
                        # hang, and pings every 50 ms cost an idle server ~2% of a core per process


def _spin_s(cfg: EngineConfig) -> float:
    """How long a worker process polls its channels before sleeping (EngineConfig.channel_spin_s)."""
    if cfg.channel_spin_s is not None:
        return cfg.channel_spin_s
    return 1e-4 if (os.cpu_count() or 1) > cfg.num_attention_workers + cfg.num_expert_workers else 0.0


def _rss(entry: dict, mb: float) -> None:
    """A process's resident memory into its /health entry, if it could be read (a process that
    just died has none: NaN is no JSON)."""
    if math.isfinite(mb):
        entry["rss_mb"] = round(mb, 1)


class Controller:
    def __init__(self, model: ModelConfig, params: dict | Weights, engine: EngineConfig, cache: CacheConfig,
                 devices: list | None, clock: Callable[[], float] = time.perf_counter,
                 load_params: Callable[[], dict | Weights] | None = None, vocab: Vocabulary | None = None):
        self.model, self.config, self.cache, self.clock, self.vocab = model, engine, cache, clock, vocab
        self.weights, self.load_params, self.devices = as_weights(params), load_params, devices
        if engine.restarts and load_params is None:
            raise ConfigError(f"recovery={engine.recovery} needs load_params: the checkpoint files to reload weights from")
        self.records: list[RecoveryRecord] = []
        self._build()

    # ---- building the cluster --------------------------------------------------------------
    def _build(self, precompile: bool = True) -> None:
        """Fresh cluster state: workers, placement, transport, store, failure detector, jobs."""
        cfg, dtype = self.config, jax.numpy.dtype(self.config.dtype)
        self.dtype = dtype
        self.health = HealthMonitor(self.clock)
        self.router = PrefixRouter(self.cache.page_size, self.cache.num_pages - 1,
                                   cache_salt(self.model, self.config.dtype, self.cache.page_size), cfg.prefix_caching)
        workers = cfg.num_attention_workers + cfg.num_expert_workers
        self._bg = concurrent.futures.ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="controller")
        self._jobs: list[_Job] = []
        self._last_heartbeat = self.clock()
        self.runtime = (RayRuntime(self.weights, cfg.transfer_deadline_s, jax.config.jax_compilation_cache_dir,
                                   cfg.ray_address, cfg.num_attention_workers + cfg.num_expert_workers,
                                   _spin_s(cfg))
                        if cfg.runtime == "ray" else LocalRuntime(self.devices))
        aw_handles, ew_handles = self.runtime.workers(cfg.num_attention_workers, cfg.num_expert_workers)
        budget = cfg.shadow_budget if cfg.resilience else 0.0
        self.placement: Placement = place(self.model.n_moe_layers, self.model.n_experts, cfg.num_expert_workers, budget,
                                          serve_all=cfg.eplb)
        self.ert: RoutingTable = self.placement.ert
        self.transport = self.runtime.transport(cfg.transfer_deadline_s)
        self.store = self.runtime.checkpoint_store(cfg) if cfg.resilience else None
        self._store_generation = 0
        self.ews = [self._new_ew(j, h) for j, h in enumerate(ew_handles)]
        self.aws = [self._new_aw(i, h) for i, h in enumerate(aw_handles)]
        self.rebalancer = Rebalancer(self, cfg.eplb_window_s, self.clock, self._bg) if cfg.eplb else None
        if precompile:
            self.grid = None if cfg.precompile == "none" else GRIDS[cfg.precompile](self.model, self.cache, cfg)
            self.precompile_s = None if self.grid is None else self._precompile(self.grid)
        self._foreground()

    def _precompile(self, grid: ShapeGrid) -> float:
        """Every stage program at every shape of the grid (the recovery subset, or all), on every
        worker (seconds taken)."""
        t0 = self.clock()
        for w in self.aws + self.ews:
            w.precompile(grid)
            w.handle.probe()                  # the heartbeat's tiny program, on this worker's device
        return self.clock() - t0

    def step_tokens(self, T: int) -> int:
        """The token bucket a step whose AWs need T rows runs at: the smallest compiled one
        (startup's grid) that holds T, so that no step compiles; T itself if nothing was."""
        return T if self.grid is None else self.grid.fit_tokens(T)

    def _foreground(self) -> None:
        """The worker processes are warm: they serve at normal CPU priority from now on."""
        for w in self.aws + self.ews:
            if isinstance(w, RemoteWorker):
                w.foreground()

    def _new_ew(self, j: int, handle: WorkerHandle | RemoteHandle) -> ExpertWorkerAPI:
        primaries, shadows = self.placement.primaries[j], self.placement.shadows[j]
        if isinstance(handle, RemoteHandle):
            return RemoteExpertWorker(j, handle, primaries, shadows, self.runtime, self.config.expert_backend,
                                      self.dtype, self.model.top_k)
        return ExpertWorker(j, handle, primaries, shadows, self.weights, self.config.expert_backend,
                            self.dtype, self.model.top_k)

    def _new_aw(self, i: int, handle: WorkerHandle | RemoteHandle) -> AttentionWorkerAPI:
        if isinstance(handle, RemoteHandle):
            return RemoteAttentionWorker(i, handle, self.runtime, self.model, self.cache, self.config, self.ert,
                                         self.dtype, self.store, self.ew_addresses, self.vocab)
        return AttentionWorker(i, handle, self.model, self.weights.attention(), self.cache, self.config,
                               self.ert, self.dtype, self.store, self.clock, self.vocab)

    def ew_addresses(self) -> dict[int, dict]:
        """Where the live EW processes take layer buffers (what every remote AW exchanges with)."""
        return {ew.index: ew.address for ew in self.ews
                if not self.health.is_failed(ew.handle.name) and isinstance(ew, RemoteExpertWorker)}

    def live_aws(self) -> list[AttentionWorkerAPI]:
        """AWs not known to have failed (a dead but undetected AW fails its next call)."""
        return [a for a in self.aws if not self.health.is_failed(a.handle.name)]

    def worker(self, name: str):
        return {w.handle.name: w for w in self.aws + self.ews}[name]

    # ---- failures ----------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """Fault injection: fail-stop the worker now (detection happens on the next call/heartbeat)."""
        self.worker(name).kill()
        self.health.killed(name)

    def hang(self, name: str, seconds: float) -> None:
        """Fault injection: the EW stops answering for `seconds` without dying (found by the
        step's deadline, then fenced like a dead one)."""
        self.worker(name).hang(seconds)
        self.health.killed(name, f"hung for {seconds:g} s")

    def processes(self) -> dict[str, dict]:
        """Every worker's pid, node, devices and resident memory, by name (/health shows them),
        the checkpoint store's where it is a process of its own (--runtime ray), and the driver's.
        A process on this host is read from /proc, never asked: a hung one must not hold up the
        engine thread that answers /health."""
        from tarragon_jax.workers.remote_worker import resident_mb
        out = {}
        for w in self.aws + self.ews:
            out[w.handle.name] = w.handle.identity()
            if isinstance(w.handle, RemoteHandle) and w.handle.alive:
                try:
                    _rss(out[w.handle.name], w.memory_mb())
                except (WorkerFailed, RemoteError):
                    pass                                 # dead or silent: no figure
        if hasattr(self.store, "identity"):
            out["store"] = self.store.identity()
            if self.store.local():
                _rss(out["store"], resident_mb(out["store"]["pid"]))
        out["driver"] = {"pid": os.getpid(), "rss_mb": round(resident_mb(), 1)}
        return out

    def failed(self, name: str, reason: str, source: str) -> RecoveryRecord | None:
        """A datapath call or heartbeat found `name` dead. Returns the record of a new failure."""
        if not self.health.report_failure(name, reason, source):
            return None
        return self._act(name, source)

    def _act(self, name: str, source: str) -> RecoveryRecord:
        worker = self.worker(name)
        rec = RecoveryRecord(name, worker.handle.id.kind, source, self.health.detection_latency_s(name),
                             process=worker.handle.identity())
        if worker.handle.alive:
            worker.kill()            # fence: a hung or slow worker must not answer (or hold memory) later
        if self.rebalancer is not None:
            self.rebalancer.failed()     # a rebalance under way is dropped
        self.records.append(rec)
        if not self.config.restarts:
            (self._ew_failed if rec.kind == "ew" else self._aw_failed)(rec, worker.handle.id.index)
        return rec

    def _ew_failed(self, rec: RecoveryRecord, j: int) -> None:
        t0 = self.clock()
        self._start(rec, lambda: self._replacement(lambda h: self._new_ew(j, h), self.ews[j], rec),
                    lambda ew: self._join_ew(ew, rec, t0))
        ert, rec.orphans_loaded = self._derive_ert()
        self._publish(ert)
        rec.reroute_s = self.clock() - t0

    def _aw_failed(self, rec: RecoveryRecord, i: int) -> None:
        t0 = self.clock()
        dead = self.aws[i]
        moving = {s.request_id: s for s in dead.live_requests()}
        self._start(rec, lambda: self._replacement(lambda h: self._new_aw(i, h), dead, rec),
                    lambda aw: self._join_aw(aw, rec, t0))
        if moving and not self.live_aws():
            self._await_replacement("aw")            # the last AW: its requests wait for one
        healthy = [a.index for a in self.live_aws()]
        by_aw = {a.index: [s.request_id for s in a.live_requests()] for a in self.live_aws()}
        by_aw[i] = list(moving)
        self.router.forget(i)
        plan = ({rid: i for rid in moving} if healthy == [i]       # only its own replacement is up
                else plan_aw_failure(by_aw, i, healthy, {rid: s.hashes[0] for rid, s in moving.items() if s.hashes}))
        for rid, target in plan.items():
            seq = moving[rid]
            seq.move()
            self.aws[target].scheduler.add(seq)
            self.router.cached(target, seq)
        rec.requests_moved = len(moving)
        rec.reroute_s = self.clock() - t0

    def _await_replacement(self, kind: str) -> bool:
        """No live worker of `kind` ("aw" or "ew") is left: wait for a replacement of that kind
        to join (the engine stalls, no request fails), at most REPLACEMENT_WAIT_S. False if none
        is being built, or none joined in time."""
        end = self.clock() + REPLACEMENT_WAIT_S
        workers = self.aws if kind == "aw" else self.ews
        while all(self.health.is_failed(w.handle.name) for w in workers):
            pending = [j for j in self._jobs if j.rec.kind == kind]
            if not pending or self.clock() >= end:
                return False
            running = [j.future for j in pending if j.future is not None]
            if running:
                concurrent.futures.wait(running, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
            else:
                time.sleep(0.05)                         # a retry's backoff
            self._settle_jobs()
        return True

    def _derive_ert(self) -> tuple[RoutingTable, int]:
        """Plan the table for the live EWs (recovery.plan_expert_routing) and carry out the host
        loads of experts left without a replica. Returns (ERT, number of experts loaded).

        A load can hit an EW that died but is not detected yet: that is a failure found by a
        call, handled as one (its own recovery), and the plan is made again without it."""
        loaded = 0
        while True:
            live = {ew.index: ew for ew in self.ews if not self.health.is_failed(ew.handle.name)}
            try:
                ert, loads = plan_expert_routing(self.placement, {ew.index for ew in self.ews} - set(live),
                                                 {j: ew.slots for j, ew in live.items()}, self.ert.version + 1)
            except RecoveryError:
                if self._await_replacement("ew"):        # every EW down: wait for one to join
                    continue
                raise
            try:
                for j, layer, expert in loads:
                    live[j].load_experts(layer, [expert])
                    loaded += 1
                return ert, loaded
            except WorkerFailed as f:
                self.failed(f.worker, f.reason, "call")

    def _publish(self, ert: RoutingTable) -> None:
        self.ert = ert
        for aw in self.aws:
            if aw.handle.alive:          # a dead AW (found or not yet) takes no transfer
                try:
                    aw.refe.publish(ert)
                except WorkerFailed:     # its process is gone: its next step call finds it
                    pass

    # ---- background replacements --------------------------------------------------------------
    def _start(self, rec: RecoveryRecord, build: Callable, join: Callable) -> None:
        job = _Job(build, join, rec)
        self._jobs.append(job)
        self._submit(job)

    def _submit(self, job: "_Job") -> None:
        job.rec.replacement_attempts += 1
        job.future = self._bg.submit(job.build)

    def _settle_jobs(self) -> None:
        """Join the replacements that are built; retry a failed build, or a replacement that hung
        or died while it joined (fenced first), after a backoff (1 s, doubling, at most 30 s), for
        as long as it takes: the service runs on the survivors meanwhile, and the record shows the
        attempts and the last error. Nothing of it raises on the engine thread."""
        for job in list(self._jobs):
            if job.future is None:
                if self.clock() >= job.retry_at:
                    self._submit(job)
                continue
            if not job.future.done():
                continue
            try:
                worker = job.future.result()
            except Exception as e:  # noqa: BLE001 -- serving goes on without the replacement
                self._retry(job, e)
                continue
            try:
                job.join(worker)
            except (WorkerFailed, RemoteError) as e:   # e.g. a store attach that a hung process never answers
                worker.kill()
                self._retry(job, e)
                continue
            self._jobs.remove(job)

    def _retry(self, job: "_Job", e: Exception) -> None:
        n = job.rec.replacement_attempts
        job.rec.replacement_error = f"attempt {n}: {type(e).__name__}: {e}"
        log.warning("replacement of %s failed (%s); retrying", job.rec.worker, job.rec.replacement_error)
        job.future, job.retry_at = None, self.clock() + min(RETRY_S[1], RETRY_S[0] * 2 ** (n - 1))

    def _replacement(self, make: Callable[[WorkerHandle], object], failed, rec: RecoveryRecord) -> object:
        """A new worker on a spare device (weights from host memory) that compiles every program
        the failed one ran before it joins: its mesh is new, so nothing is compiled for it yet."""
        worker = make(self.runtime.replacement(failed.handle))
        worker.programs.extend(failed.programs)
        t0 = self.clock()
        worker.programs.replay(worker.handle)
        worker.handle.probe()                 # the heartbeat's program, compiled before it joins
        rec.recompile_s = self.clock() - t0
        if isinstance(worker, RemoteWorker):
            worker.foreground()
        return worker

    def _join_ew(self, ew: ExpertWorkerAPI, rec: RecoveryRecord, t0: float) -> None:
        ew.joined_at = self.clock()
        self.ews[ew.index] = ew
        self.health.revive(ew.handle.name)
        self._publish(self._derive_ert()[0])
        rec.replacement_ready_s = self.clock() - t0

    def _join_aw(self, aw: AttentionWorkerAPI, rec: RecoveryRecord, t0: float) -> None:
        aw.joined_at = self.clock()
        aw.refe.publish(self.ert)
        if isinstance(aw, RemoteAttentionWorker) and self.store is not None and aw.store_actor is not self.store.actor:
            aw.attach_store(self.store)      # built while the store was being replaced
        self.aws[aw.index] = aw
        self.health.revive(aw.handle.name)
        rec.replacement_ready_s = self.clock() - t0

    def _check_store(self) -> None:
        """The checkpoint store's process (--runtime ray), looked at every heartbeat without
        waiting: found dead, or silent for STORE_PING_S, it is fenced and a new one is started in
        the background. Meanwhile snapshots go nowhere and restores recompute; once it joins,
        every AW refills it with the committed blocks of its requests."""
        if not hasattr(self.store, "check") or any(j.rec.kind == "store" for j in self._jobs):
            return
        why = self.store.check(STORE_PING_S)
        if why is None:
            return
        t0, self._store_generation = self.clock(), self._store_generation + 1
        rec = RecoveryRecord("store", "store", "heartbeat", None, process=self.store.identity())
        self.health.report_failure("store", why, "heartbeat")
        self.records.append(rec)
        self.store.fence()
        generation = self._store_generation
        self._start(rec, lambda: self.runtime.checkpoint_store(self.config, generation),
                    lambda store: self._join_store(store, rec, t0))

    def _join_store(self, store, rec: RecoveryRecord, t0: float) -> None:
        self.store = store
        for aw in self.aws:
            if aw.handle.alive and isinstance(aw, RemoteAttentionWorker):
                try:
                    aw.attach_store(store)
                except (WorkerFailed, RemoteError):
                    pass                 # its process is gone: its next step call finds it
        self.health.revive("store")
        rec.replacement_ready_s = self.clock() - t0

    @property
    def recovering(self) -> bool:
        return bool(self._jobs)

    def tick(self) -> list[RecoveryRecord]:
        """At a step boundary: join finished replacements, and (at most every interval) probe the
        workers no data-path call has heard from within the interval. Returns new failures."""
        self._settle_jobs()
        if self.rebalancer is not None:
            self.rebalancer.tick()
        if not self.config.resilience or self.clock() - self._last_heartbeat < self.config.heartbeat_interval_s:
            return []
        self._last_heartbeat = self.clock()
        bound = min(self.config.transfer_deadline_s, PROBE_TIMEOUT_S)
        probes = {}
        for w in self.aws + self.ews:
            name, remote = w.handle.name, isinstance(w.handle, RemoteHandle)
            if self.health.is_failed(name):
                continue
            if remote and w.handle.gone():                # its process died: its channel closed
                probes[name] = lambda: False
            elif self.health.silent_for(name) >= (max(self.config.heartbeat_interval_s, REMOTE_PROBE_S) if remote
                                                  else self.config.heartbeat_interval_s):
                probes[name] = functools.partial(w.handle.probe, bound)
        found = [self._act(name, "heartbeat") for name in self.health.heartbeat(probes)]
        self._check_store()
        return found

    def wait_recoveries(self) -> None:
        """Block until every background replacement joined, and a rebalance under way is done
        (tests, shutdown)."""
        while self._jobs:
            running = [j.future for j in self._jobs if j.future is not None]
            if running:
                concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            else:
                time.sleep(max(0.0, min(j.retry_at for j in self._jobs) - self.clock()))
            self.tick()
        if self.rebalancer is not None:
            self.rebalancer.settle()

    # ---- restart baseline ----------------------------------------------------------------------
    def restart(self, requests: list[Sequence], rec: RecoveryRecord) -> None:
        """What a MegaScale-Infer-like system does on any failure: tear every worker down, clear
        the compiled programs, reload weights from the checkpoint files, rebuild meshes, then
        re-prefill every request's prompt and sent tokens in chunked passes batched across
        requests (the strongest restart: request migration in Dynamo, vLLM's resume), or, under
        restart_regenerate, regenerate the sent tokens one step at a time."""
        t0 = self.clock()
        self.shutdown()
        for w in self.aws + self.ews:
            if w.handle.alive:
                w.kill()                         # tear down: every buffer of every worker goes
        jax.clear_caches()
        self.weights = as_weights(self.load_params())
        history = self.health.events
        self._build(precompile=False)    # the strongest restart: compile on first use, from the cache
        self.health.events[:0] = history        # the new cluster's record starts with what happened
        regenerate = self.config.recovery == "restart_regenerate"
        for i, seq in enumerate(requests):
            rec.tokens_recomputed += seq.num_cached if regenerate else seq.num_tokens - 1
            seq.regenerate() if regenerate else seq.reprefill()
            self.aws[i % len(self.aws)].scheduler.add(seq)
        rec.restart_s = self.clock() - t0

    def shutdown(self) -> None:
        self._bg.shutdown(wait=False, cancel_futures=True)    # a build under way is abandoned
        self._jobs.clear()
        if self.transport is not None:
            self.transport.close()
        self.runtime.close()
        if self.store is not None:
            self.store.close()
