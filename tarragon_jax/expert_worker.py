"""Expert worker (EW): hosts expert weight stacks per layer and runs one grouped FFN over the
tokens of a layer from every AW. Stateless apart from weights, so a replayed input gives the
same output on any replica of the expert.

Slots of a layer are its primaries (0..P-1), then shadows and experts loaded after a failure
(P..). Shadows live in a separate stack that the program touches only when a row targets one,
so idle shadows cost memory, not compute (the paper keeps shadows inactive for the same reason).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tarragon_jax.model.expert_stage import expert_layer, pack_rows, take_rows
from tarragon_jax.program_log import ProgramLog
from tarragon_jax.runtime import WorkerHandle
from tarragon_jax.scheduler import bucket
from tarragon_jax.shape_grid import ShapeGrid

_KEYS = ("w_gate", "w_up", "w_down")


def resolve_backend(backend: str, platform: str) -> str:
    """`auto` picks the Pallas kernel where it compiles natively; on CPU it would only interpret."""
    if backend != "auto":
        return backend
    return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "ragged_dot"


@dataclasses.dataclass
class ExpertInput:
    """One AW's rows for this EW and layer: x on the EW's mesh, slot per row (-1 = padding)."""
    aw: int
    x_NxD: jax.Array
    slot_N: np.ndarray


class ExpertWorker:
    def __init__(self, index: int, handle: WorkerHandle, primaries: list[list[int]],
                 shadows: list[list[int]], experts: list[dict], backend: str, dtype):
        """primaries/shadows[layer] = expert ids in slot order; experts = host weights of every expert."""
        self.index, self.handle, self.dtype = index, handle, dtype
        self.platform = handle.devices[0].platform
        self.backend = resolve_backend(backend, self.platform)
        self.slots = [list(p) + list(s) for p, s in zip(primaries, shadows)]
        self.n_primary = [len(p) for p in primaries]
        self.weights = [self._stack(experts[l], p) for l, p in enumerate(primaries)]
        self.extra = [self._stack(experts[l], s) if s else None for l, s in enumerate(shadows)]
        self.programs = ProgramLog()

    def _stack(self, layer_experts: dict, ids: list[int]) -> dict:
        return self.handle.put({k: np.asarray(layer_experts[k][ids]).astype(self.dtype) for k in _KEYS})

    def precompile(self, grid: ShapeGrid) -> None:
        """Run the packing, slicing and expert programs (primaries-only and with-shadows) once at
        every grid shape on padding rows, so no serving step compiles (programs are logged)."""
        call, put, d = self.programs.call, self.handle.put, self.weights[0]["w_gate"].shape[1]
        zero = put(np.int32(0))
        for n, N in grid.packs():
            buf = call(pack_rows, put(np.zeros((n, d), self.dtype)), put(np.zeros((N, d), self.dtype)), zero)
            call(take_rows, buf, zero, N)
        for n in grid.ew_rows:
            buf, idx = put(np.zeros((n, d), self.dtype)), put(np.arange(n, dtype=np.int32))
            for layer in range(len(self.weights)):
                call(expert_layer, self.weights[layer], None, buf, idx, idx,
                     put(np.zeros(self.n_primary[layer], np.int32)), backend=self.backend)
                self._warm_shadow_program(layer, buf)

    def load_experts(self, layer: int, ids: list[int], layer_experts: dict) -> None:
        """Load experts from host memory into new slots appended after the existing ones (no
        replica left elsewhere). The extra stack grows, so this layer's program recompiles once."""
        new = self._stack(layer_experts, ids)
        old = self.extra[layer]
        self.extra[layer] = new if old is None else jax.tree.map(
            lambda a, b: jax.numpy.concatenate([a, b]), old, new)
        self.slots[layer] += list(ids)

    def run_layer(self, layer: int, inputs: list[ExpertInput]) -> list[jax.Array]:
        """Outputs per input, in input order and row order; padding rows come back as zeros."""
        self.handle.check()
        sizes_in = [len(i.slot_N) for i in inputs]
        n = bucket(sum(sizes_in), 8)
        slots = np.full(n, -1, np.int32)
        slots[:sum(sizes_in)] = np.concatenate([i.slot_N for i in inputs])
        use_extra = bool((slots >= self.n_primary[layer]).any())
        n_slots = len(self.slots[layer]) if use_extra else self.n_primary[layer]
        perm = np.argsort(np.where(slots < 0, n_slots, slots), kind="stable").astype(np.int32)
        inv = np.argsort(perm).astype(np.int32)
        group_sizes = np.bincount(slots[slots >= 0], minlength=n_slots).astype(np.int32)
        single = len(inputs) == 1 and sizes_in[0] == n    # one sender (e.g. one busy AW), bucketed:
        if single:                                        # its rows are the buffer, no pack, no cut
            buf = inputs[0].x_NxD
            perm, inv, group_sizes = self.handle.put((perm, inv, group_sizes))
        else:
            offsets = np.cumsum([0] + sizes_in[:-1]).astype(np.int32)
            buf, perm, inv, group_sizes, *offs = self.handle.put(
                (np.zeros((n, inputs[0].x_NxD.shape[1]), inputs[0].x_NxD.dtype), perm, inv, group_sizes, *offsets))
            for i, off in zip(inputs, offs):
                buf = self.programs.call(pack_rows, buf, i.x_NxD, off)
        compiled = expert_layer._cache_size()
        y = self.programs.call(expert_layer, self.weights[layer], self.extra[layer] if use_extra else None, buf,
                               perm, inv, group_sizes, backend=self.backend)
        if not use_extra and expert_layer._cache_size() != compiled:
            self._warm_shadow_program(layer, buf)
        if single:
            return [y]
        return [self.programs.call(take_rows, y, off, size) for off, size in zip(offs, sizes_in)]

    def _warm_shadow_program(self, layer: int, buf_NxD: jax.Array) -> None:
        """Compile the with-shadows variant of a shape when the primaries-only one was just
        compiled, so a failover finds its program ready (shadows are kept warm, not just loaded)."""
        extra = self.extra[layer]
        if extra is None:
            return
        n, S = buf_NxD.shape[0], len(self.slots[layer])
        ident = np.arange(n, dtype=np.int32)
        self.programs.call(expert_layer, self.weights[layer], extra, buf_NxD,
                           *self.handle.put((ident, ident, np.zeros(S, np.int32))), backend=self.backend)

    def kill(self) -> None:
        """Fail-stop: the device buffers are gone and every later call raises WorkerFailed."""
        self.handle.alive = False
        for a in jax.tree.leaves((self.weights, self.extra)):
            a.delete()
