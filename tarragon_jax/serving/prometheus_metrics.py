"""What `GET /metrics` exposes (Prometheus text format, through prometheus_client).

Every metric lives in the server's own CollectorRegistry (two servers in one process never mix).
Event-driven ones (tokens, TTFT, inter-token latency, recoveries and their stalls) are updated by
`after_step` on the engine thread from the step's TokenEvents and the engine's own timestamps;
the state gauges (worker up, ERT version, running / waiting, KV pages, per-EW and per-layer rows,
each expert's share of its layer's load) are read by
`refresh`, which the scrape runs on the engine thread, so a scrape sees one consistent moment and
the datapath pays nothing between scrapes.

A recovery's stall is the paper's: once every request in flight at the detection has its next
token, the longest gap spanning it minus the median gap before it (metrics.stall_around).
"""
from __future__ import annotations

import prometheus_client as prom

from tarragon_jax import metrics as engine_metrics
from tarragon_jax.control import expert_load
from tarragon_jax.serving.engine import Engine, TokenEvent
from tarragon_jax.workers.sequence import SeqState

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.worker_up = prom.Gauge("tarragon_worker_up", "1 if the worker is live, 0 if failed", ["worker"], registry=r)
        self.recoveries = prom.Counter("tarragon_recoveries", "Worker failures recovered from", ["kind"], registry=r)
        self.stall = prom.Histogram("tarragon_recovery_stall_seconds", "Extra token gap a recovery cost the "
                                    "requests in flight", buckets=_LATENCY_BUCKETS, registry=r)
        self.ert_version = prom.Gauge("tarragon_ert_version", "Version of the expert routing table", registry=r)
        self.running = prom.Gauge("tarragon_requests_running", "Requests with KV pages on an AW", registry=r)
        self.waiting = prom.Gauge("tarragon_requests_waiting", "Requests accepted, not yet running", registry=r)
        self.ttft = prom.Histogram("tarragon_time_to_first_token_seconds", "Submission to first token",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = prom.Histogram("tarragon_inter_token_latency_seconds", "Gap between a request's tokens",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = prom.Counter("tarragon_generation_tokens", "Tokens generated", registry=r)
        self.kv_pages = prom.Gauge("tarragon_kv_pages_used", "KV pages in use", ["worker"], registry=r)
        self.expert_rows = prom.Counter("tarragon_expert_rows", "(token, expert) pairs an EW computed, replays "
                                        "included", ["worker"], registry=r)
        self.layer_rows = prom.Counter("tarragon_expert_layer_rows", "(token, expert) pairs an EW computed in one "
                                       "MoE layer (a step waits for each layer's busiest EW)", ["worker", "layer"],
                                       registry=r)
        self.expert_load = prom.Gauge("tarragon_expert_load", "Fraction of the layer's (token, expert) pairs the "
                                      "expert got between the last two scrapes that saw any", ["layer", "expert"],
                                      registry=r)
        self.prefix_queries = prom.Counter("tarragon_prefix_cache_queries", "Prompt tokens of requests an AW admitted "
                                           "(looked up in its prefix cache)", registry=r)
        self.prefix_hits = prom.Counter("tarragon_prefix_cache_hit_tokens", "Of those, tokens whose KV was cached "
                                        "(not computed)", registry=r)
        self.prefix_blocks = prom.Gauge("tarragon_prefix_cache_blocks", "KV blocks an AW caches by prefix hash",
                                        ["worker"], registry=r)
        self._prefix: dict[tuple, tuple[int, int]] = {}     # (AW, joined at) -> (queries, hits) at the last scrape
        self._records = 0
        self._stalls: list[tuple[float, list[int]]] = []     # (detected at, requests in flight then)
        self._rows = expert_load.SlotRowReader()            # per EW: its per-slot counts at the last scrape

    def after_step(self, engine: Engine, events: list[TokenEvent]) -> None:
        """On the engine thread, after every step: tokens, latencies, new recoveries, stalls."""
        times = engine.metrics.requests
        for ev in events:
            t = times.get(ev.request_id)
            if t is None:
                continue
            if ev.index == 0 and t.ttft_s is not None:
                self.ttft.observe(t.ttft_s)
            elif len(t.token_s) >= 2:
                self.itl.observe(t.token_s[-1] - t.token_s[-2])
        self.tokens.inc(len(events))
        records = engine.controller.records
        for rec in records[self._records:]:
            self.recoveries.labels(kind=rec.kind).inc()
            failed = [e.t for e in engine.controller.health.events if e.worker == rec.worker and e.kind == "failed"]
            at = failed[-1] if failed else engine.metrics.clock()
            self._stalls.append((at, [rid for rid, seq in engine.requests.items() if seq.state is not SeqState.FINISHED]))
        self._records = len(records)
        self._stalls = [s for s in self._stalls if not self._observe_stall(engine, *s)]

    def _observe_stall(self, engine: Engine, at: float, rids: list[int]) -> bool:
        """True once the stall of the recovery detected at `at` is known (and observed)."""
        times = engine.metrics.requests
        for rid in rids:
            seq = engine.requests.get(rid)
            if seq is not None and seq.state is not SeqState.FINISHED and not any(t > at for t in times[rid].token_s):
                return False                        # in flight then, no token since: not over yet
        self.stall.observe(max(0.0, engine_metrics.stall_around([times[r] for r in rids if r in times], at)))
        return True

    def refresh(self, engine: Engine) -> None:
        """On the engine thread, at a scrape: the state gauges and the per-EW counters."""
        ctl = engine.controller
        for w in ctl.aws + ctl.ews:
            self.worker_up.labels(worker=w.handle.name).set(0 if ctl.health.is_failed(w.handle.name) else 1)
        self.ert_version.set(ctl.ert.version)
        live = [s for aw in ctl.live_aws() for s in aw.live_requests()]
        self.running.set(sum(s.state is SeqState.RUNNING for s in live))
        self.waiting.set(sum(s.state is SeqState.WAITING for s in live))
        for aw in ctl.aws:
            self.kv_pages.labels(worker=aw.handle.name).set(aw.blocks.capacity - aw.blocks.num_free)
            self._read_prefix(aw.handle.name, aw.joined_at, aw.prefix_stats)
        n_layers, n_experts = ctl.model.n_moe_layers, ctl.model.n_experts
        experts = [[0] * n_experts for _ in range(n_layers)]
        for ew in ctl.ews:
            name = ew.handle.name
            if ctl.health.is_failed(name) or not ew.handle.alive:
                continue                              # its count is lost with it; the counters stay
            rows = self._rows.read(name, ew)          # a replacement counts from 0
            self.expert_rows.labels(worker=name).inc(int(sum(r.sum() for r in rows)))
            for layer, r in enumerate(rows):
                self.layer_rows.labels(worker=name, layer=str(layer)).inc(int(r.sum()))
            for layer, per in enumerate(expert_load.expert_rows(rows, ew.slots, n_experts)):
                experts[layer] = [a + b for a, b in zip(experts[layer], per)]
        for layer, per in enumerate(experts):
            total = sum(per)
            for e, n in enumerate(per):
                if total:
                    self.expert_load.labels(layer=str(layer), expert=str(e)).set(n / total)

    def _read_prefix(self, name: str, joined_at: float, stats) -> None:
        """An AW's prefix-cache counts into the counters, as differences (a replacement of the AW,
        joined later, counts from 0)."""
        q0, h0 = self._prefix.get((name, joined_at), (0, 0))
        self.prefix_queries.inc(stats.query_tokens - q0)
        self.prefix_hits.inc(stats.hit_tokens - h0)
        self._prefix[(name, joined_at)] = (stats.query_tokens, stats.hit_tokens)
        self.prefix_blocks.labels(worker=name).set(stats.cached_blocks)

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)
