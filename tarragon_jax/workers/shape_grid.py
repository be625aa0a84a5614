"""Every array shape the stage programs can see, derived from the configs and the bucketing rules.

Why: a batch shape seen for the first time compiles inside the step that meets it, with every
request waiting, including the step in which a failure moved work onto the survivors (on a cold
cache: 1.28 s EW / 0.84 s AW failover stalls, README). Precompiling the grid at startup (`--precompile`) makes every later step,
failover steps included, a cache hit. The bucket rules live with their users (scheduler: T, P, R;
the engine pads every AW of a step to one T, so an EW call varies only in how many AWs send);
this module only enumerates their ranges. Host-only.

`recovery_grid` is the cheap subset compiled at startup by default: what a recovery runs that
steady serving may not have met yet. A step that recomputes moved (or restarted) requests has
one of two token buckets (scheduler: prefill_chunk's or max_step_tokens'), so that is two T at
every P and R; and the restore writes at every block count. Shadows take over inside the same
EW program, and a mid-step replay reruns shapes the step already ran. (Steps whose requests ask
for logit_bias or penalties meet their programs in steady serving first: only the full grid
holds them.)
"""
from __future__ import annotations

import dataclasses

from tarragon_jax.config import MAX_LOGIT_BIAS, CacheConfig, EngineConfig, ModelConfig
from tarragon_jax.workers.logit_adjust import entries_buckets
from tarragon_jax.workers.scheduler import bucket, recovery_buckets


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
    senders: tuple[int, ...]      # AWs whose buffers one EW layer call takes (all AWs of a step pad to one T)
    blocks: tuple[int, ...]       # KV blocks in one snapshot read / restore write
    entries: tuple[int, ...] = () # L: a row's logit_bias and penalty entries (logit_adjust)

    def describe(self) -> str:
        """What precompiling this grid compiles, for the launchers' startup line."""
        span = lambda xs: f"{xs[0]}" if len(xs) == 1 else f"{xs[0]}..{xs[-1]} ({len(xs)})"
        return (f"token buckets {span(self.tokens)} x table widths {span(self.pages)} (attention), x row counts "
                f"{span(self.rows)} (LM head; sampling per row count{self._entries()}), x sending AWs "
                f"{span(self.senders)} (experts); "
                f"KV block counts {span(self.blocks)} (snapshot reads, restore writes)")

    def _entries(self) -> str:
        return f"; bias and penalties per entries bucket {self.entries[0]}..{self.entries[-1]}" if self.entries else ""

    def fit_tokens(self, T: int) -> int:
        """The smallest compiled token bucket that holds a step of T token rows (T itself if none
        does): a step pads up to it rather than compile on the engine thread while requests wait."""
        return next((t for t in self.tokens if t >= T), T)


def shape_grid(model: ModelConfig, cache: CacheConfig, engine: EngineConfig) -> ShapeGrid:
    max_tokens = engine.max_step_tokens
    max_pages = min(-(-model.max_position // cache.page_size), cache.num_pages - 1)
    return ShapeGrid(
        tokens=buckets(8, max_tokens),
        pages=buckets(1, max_pages),
        rows=buckets(4, min(engine.max_running, max_tokens)),
        senders=tuple(range(1, engine.num_attention_workers + 1)),
        blocks=buckets(4, cache.num_pages),
        entries=entries_buckets(model.max_position + MAX_LOGIT_BIAS),
    )


def recovery_grid(model: ModelConfig, cache: CacheConfig, engine: EngineConfig) -> ShapeGrid:
    full = shape_grid(model, cache, engine)
    return dataclasses.replace(full, tokens=recovery_buckets(engine.prefill_chunk, engine.max_step_tokens), entries=())
