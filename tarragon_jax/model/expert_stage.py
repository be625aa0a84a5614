"""Expert-worker stage program: one grouped SwiGLU FFN over one layer's tokens from every AW.

Each AW sends its packed buffer (model/wire.py: hidden states + the (EW, slot) of every top-k
choice) as it left its layer program. This EW keeps the (token, k) pairs routed to it, sorts them
by slot on the device (the grouped matmul wants contiguous groups; an idle slot is an empty
group, so an inactive shadow costs nothing), runs the FFN over the weights of every slot it holds
(primaries then shadows, one stack: no copy when a shadow becomes active) and answers each AW with
[T, k, D]: the output at every pair it served, zero elsewhere. It also adds the pairs it served
to a running count per slot on its device (the load the rebalancer and /metrics read, once a
window or a scrape).
Nothing is read on the host.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.swiglu_ffn import grouped_swiglu_ffn, grouped_swiglu_ffn_slots
from tarragon_jax.model import wire


@functools.partial(jax.jit, static_argnames=("top_k", "backend"))
def expert_layer(weights: dict, ew_index: jax.Array, rows_S: jax.Array, bufs: tuple, *, top_k: int,
                 backend: str) -> tuple[tuple, jax.Array]:
    """weights: {"w_gate" [S, D, F], "w_up" [S, D, F], "w_down" [S, F, D]} for this EW's S slots
    (backend "tiles": tuples of S per-slot arrays instead, see grouped_swiglu_ffn_slots);
    ew_index: int32 scalar, this EW; rows_S: int32 [S], pairs each slot served so far; bufs: one
    packed [T_i, D + ...] buffer per AW. Returns (one [T_i, k, D] array per buffer, in the
    buffers' dtype; rows_S plus the pairs each slot served here)."""
    per_slot = isinstance(weights["w_gate"], (tuple, list))
    S = len(weights["w_gate"]) if per_slot else weights["w_gate"].shape[0]
    D = weights["w_down"][0].shape[-1] if per_slot else weights["w_down"].shape[-1]
    hn, slot = [], []
    for buf in bufs:
        h_TxD, route_Tx2k = wire.unpack(buf, D)
        hn.append(h_TxD)
        slot.append(jnp.where(route_Tx2k[:, :top_k] == ew_index, route_Tx2k[:, top_k:], -1).reshape(-1))
    hn_all, slot_P = jnp.concatenate(hn), jnp.concatenate(slot)          # P = sum_i T_i * k pairs
    key_P = jnp.where(slot_P >= 0, slot_P, S)                          # unserved pairs sort last
    perm_P = jnp.argsort(key_P, stable=True)                            # served pairs first, by slot
    sizes_S = jnp.zeros(S, jnp.int32).at[key_P].add(1, mode="drop")
    x_sorted = hn_all[perm_P // top_k]
    ws = (weights["w_gate"], weights["w_up"], weights["w_down"])
    y_sorted = (grouped_swiglu_ffn_slots(x_sorted, *ws, sizes_S) if per_slot
                else grouped_swiglu_ffn(x_sorted, *ws, sizes_S, backend=backend))
    y_P = jnp.zeros_like(y_sorted).at[perm_P].set(y_sorted)   # unserved pairs: past every group, zeros
    out, off = [], 0
    for buf in bufs:
        T = buf.shape[0]
        out.append(y_P[off:off + T * top_k].reshape(T, top_k, D))
        off += T * top_k
    return tuple(out), rows_S + sizes_S.astype(rows_S.dtype)
