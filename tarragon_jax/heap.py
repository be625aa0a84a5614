"""Keep Python's cycle collector off the serving threads.

After start-up a serving process holds ~440k long-lived Python objects (jax's caches, the
model's pytrees, compiled programs' wrappers). A full (oldest-generation) collection walks all
of them: 0.3-0.5 s with every Python thread stopped, i.e. a decode step that long, every minute
or so under load; more than a failover's stall. Moving what start-up built into the permanent
generation (gc.freeze, as vLLM's engine does after start-up) leaves the collector only what
serving allocates. For a process that serves and nothing else: the launchers and worker
processes call it once warm; a library user decides for their own process.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then exempt every live object from later
    collections (objects allocated from now on are collected as usual). The number frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
