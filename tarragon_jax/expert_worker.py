"""Expert worker (EW): hosts expert weight stacks per layer and runs one grouped FFN over the
tokens of a layer from every AW. Stateless apart from weights, so a replayed input gives the
same output anywhere the expert lives."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tarragon_jax.model.expert_stage import expert_layer
from tarragon_jax.runtime import WorkerHandle


@dataclasses.dataclass
class ExpertInput:
    """One AW's rows for this EW and layer: x on the EW's mesh, slot per row (-1 = padding)."""
    aw: int
    x_NxD: jax.Array
    slot_N: np.ndarray


def resolve_backend(backend: str, platform: str) -> str:
    """`auto` picks the Pallas kernel where it compiles natively; on CPU it would only interpret."""
    if backend != "auto":
        return backend
    return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "ragged_dot"


class ExpertWorker:
    def __init__(self, index: int, handle: WorkerHandle, hosted: list[list[int]], experts: list[dict],
                 backend: str, dtype):
        """hosted[layer] = expert ids in slot order; experts = host weights of every expert."""
        self.index, self.handle = index, handle
        self.backend = resolve_backend(backend, handle.devices[0].platform)
        self.hosted = [list(h) for h in hosted]
        self.weights = [handle.put({k: np.asarray(experts[l][k][ids]).astype(dtype) for k in experts[l]})
                        for l, ids in enumerate(self.hosted)]

    def run_layer(self, layer: int, inputs: list[ExpertInput]) -> list[jax.Array]:
        """Outputs per input, in input order and row order; padding rows come back as zeros."""
        slots = np.concatenate([i.slot_N for i in inputs])
        n_slots = len(self.hosted[layer])
        perm = np.argsort(np.where(slots < 0, n_slots, slots), kind="stable").astype(np.int32)
        inv = np.argsort(perm).astype(np.int32)
        sizes = np.bincount(slots[slots >= 0], minlength=n_slots).astype(np.int32)
        out = expert_layer(self.weights[layer], tuple(i.x_NxD for i in inputs),
                           *self.handle.put((perm, inv, sizes)), backend=self.backend)
        return list(out)
