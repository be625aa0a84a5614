"""The one array an attention worker sends the expert workers per MoE layer.

A transfer between meshes costs about as much per array as a small program call (docs/results.md, host cost of a layer), so
the expert inputs and their routing travel together: [T, D + n] in the activation dtype, the
post-norm hidden states followed by T x I int32 routing columns (per top-k choice: the EW that
serves it, then the slot there; EW -1 for padding tokens) bit-cast into the activation dtype. A
bit-cast survives every copy and transfer exactly; nothing does arithmetic on those columns.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _width(dtype) -> int:
    return 4 // jnp.dtype(dtype).itemsize          # activation elements per int32


def pack(hn_TxD: jax.Array, route_TxI: jax.Array) -> jax.Array:
    """[T, D] activations + [T, I] int32 -> [T, D + I * (4 / itemsize)] in hn's dtype."""
    T = hn_TxD.shape[0]
    bits = jax.lax.bitcast_convert_type(route_TxI.astype(jnp.int32), hn_TxD.dtype).reshape(T, -1)
    return jnp.concatenate([hn_TxD, bits], axis=1)


def unpack(buf_TxW: jax.Array, d_model: int) -> tuple[jax.Array, jax.Array]:
    """Inverse of pack: ([T, D] activations, [T, I] int32)."""
    T, r = buf_TxW.shape[0], _width(buf_TxW.dtype)
    bits = buf_TxW[:, d_model:]
    if r > 1:
        bits = bits.reshape(T, -1, r)
    return buf_TxW[:, :d_model], jax.lax.bitcast_convert_type(bits, jnp.int32)


def width(d_model: int, n_ints: int, dtype) -> int:
    """Columns of a packed buffer (for precompiling its shapes)."""
    return d_model + n_ints * _width(dtype)
