"""Expert load from the EWs' device counters: rows per (layer, slot) since the last read, and
rows per (layer, expert) through each EW's slot list. No jax: the counters arrive as numpy.

Each EW counts the (token, k) pairs every slot computed since it joined (on the device, read with
`slot_rows`, one wait per EW). A reader keeps the last counts per EW name and returns the
difference; a replacement worker under the same name counts from when it joined, and a slot
list that grew (orphans loaded after a failure) counts its new slots from zero.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


class SlotRowReader:
    """Rows per (layer, slot) each EW served since this reader last read it."""

    def __init__(self):
        self._last: dict[str, tuple[int, list[np.ndarray]]] = {}   # name -> (id of the worker, counts)

    def read(self, name: str, worker) -> list[np.ndarray]:
        """Per layer, int64 [S]: rows since the last read of `name` (a new worker: since it joined)."""
        now = worker.slot_rows()
        seen, last = self._last.get(name, (None, []))
        self._last[name] = (id(worker), now)
        if seen != id(worker):
            last = []
        return [n - _fit(p, len(n)) for n, p in zip(now, list(last) + [None] * (len(now) - len(last)))]


def _fit(counts: np.ndarray | None, n: int) -> np.ndarray:
    """The last counts padded with zeros to n slots (slots appended since start at zero)."""
    if counts is None:
        return np.zeros(n, np.int64)
    return np.pad(counts, (0, max(0, n - len(counts))))[:n]


def expert_rows(rows: Sequence[np.ndarray], slots: Sequence[Sequence[int]], n_experts: int) -> list[list[int]]:
    """Per layer, rows per expert: each slot's rows go to the expert it holds (a slot marked < 0,
    being overwritten, to none)."""
    out = []
    for r, ids in zip(rows, slots):
        per = [0] * n_experts
        for slot, e in enumerate(ids[:len(r)]):
            if e >= 0:
                per[e] += int(r[slot])
        out.append(per)
    return out


def imbalance(per_ew: Mapping[object, float]) -> float:
    """max / mean over EWs (1.0 when nothing ran)."""
    values = list(per_ew.values())
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def summary(rows: Mapping[object, Sequence[np.ndarray]]) -> dict:
    """EW load max/mean of per-EW rows ({ew: per layer [S]}): over all layers (rows summed) and in
    each layer (a step waits for each layer's busiest EW), and the worst layer's."""
    per_layer = [imbalance({j: int(r[l].sum()) for j, r in rows.items()}) for l in range(len(next(iter(rows.values()))))] \
        if rows else []
    return {"ew_load": imbalance({j: int(sum(x.sum() for x in r)) for j, r in rows.items()}),
            "ew_load_worst_layer": max(per_layer, default=1.0), "ew_load_per_layer": per_layer}
