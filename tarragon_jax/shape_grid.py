"""Every array shape the stage programs can see, derived from the configs and the bucketing rules.

Why: a batch shape seen for the first time compiles inside the step that meets it, with every
request waiting, including the step in which a failure moved work onto the survivors (on a cold
cache: 1.28 s EW / 0.84 s AW failover stalls, README). Precompiling the grid at startup (`--precompile`) makes every later step,
failover steps included, a cache hit. The bucket rules live with their users (scheduler: T, P, R;
forwarding engine: N; expert worker: n); this module only enumerates their ranges. Host-only.
"""
from __future__ import annotations

import dataclasses

from tarragon_jax.config import CacheConfig, EngineConfig, ModelConfig
from tarragon_jax.scheduler import bucket


def buckets(minimum: int, largest: int) -> tuple[int, ...]:
    """bucket(n, minimum) for every n in 1..largest: powers of two from `minimum`."""
    out, b = [], minimum
    while b < bucket(largest, minimum):
        out.append(b)
        b *= 2
    return tuple(out + [bucket(largest, minimum)])


@dataclasses.dataclass(frozen=True)
class ShapeGrid:
    tokens: tuple[int, ...]       # T: tokens of one AW step
    pages: tuple[int, ...]        # P: block-table width of a step
    rows: tuple[int, ...]         # R: requests of a step (rows that may sample)
    sends: tuple[int, ...]        # N: rows one AW sends one EW for one layer
    ew_rows: tuple[int, ...]      # n: rows one EW runs for one layer (all AWs packed)
    blocks: tuple[int, ...]       # KV blocks in one snapshot read / restore write

    def sends_for(self, T: int, top_k: int) -> tuple[int, ...]:
        """N buckets that T tokens can produce (at most T * top_k rows)."""
        return tuple(n for n in self.sends if n <= bucket(T * top_k, 8))

    def packs(self) -> list[tuple[int, int]]:
        """(n, N): an N-row message packed into (or cut out of) an n-row EW buffer."""
        return [(n, N) for n in self.ew_rows for N in self.sends if N <= n]


def shape_grid(model: ModelConfig, cache: CacheConfig, engine: EngineConfig) -> ShapeGrid:
    max_tokens = engine.max_step_tokens
    max_pages = min(-(-model.max_position // cache.page_size), cache.num_pages - 1)
    max_sends = max_tokens * model.top_k
    return ShapeGrid(
        tokens=buckets(8, max_tokens),
        pages=buckets(1, max_pages),
        rows=buckets(4, min(engine.max_running, max_tokens)),
        sends=buckets(8, max_sends),
        ew_rows=buckets(8, engine.num_attention_workers * bucket(max_sends, 8)),
        blocks=buckets(4, cache.num_pages),
    )
