"""Grouped matmul in Pallas Triton: the CUDA default (H100/H200 included), interpret mode on CPU.

Grid (work item W, n tile). A work item is a row tile inside one group (gmm_common); the kernel
streams that group's [k, bn] weight column block once, k-tile by k-tile, and masks rows outside
the group on load and store, so no token padding or sorting copy is needed. Triton has no
scalar prefetch, so metadata arrives as plain [W] int32 refs and weights as the whole [g, k, n]
ref, indexed with the dynamic group id (pointer arithmetic; nothing is staged whole).

With two weight refs (w_gate, w_up) the same pass computes silu(x @ w_gate) * (x @ w_up): x is
read once and the [m, 2f] pre-activation never reaches memory.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import gmm_common as common


def block_sizes(m, g, k, n, *, interpret, n_w=1):
    """(bm, bk, bn). Triton wants powers of two and >= 16 per dot dim; interpret mode wants few
    grid steps (each one is a loop iteration of XLA ops on CPU). The fused gate/up kernel keeps
    two [bm, bn] f32 accumulators: at bm 64 it takes bn 64, or sm_90 needs 255 registers a
    thread and fits one block per SM (launch/triton_check.py)."""
    bm = min(64, max(16, common.next_pow2(-(-m // max(g, 1)))))
    if interpret:
        return bm, min(512, max(16, common.next_pow2(k))), min(512, max(16, common.next_pow2(n)))
    bn_max = 64 if n_w == 2 and bm >= 64 else 128
    return bm, min(64, max(16, common.next_pow2(k))), min(bn_max, max(16, common.next_pow2(n)))


def _kernel(group_ref, row_ref, cnt_ref, x_ref, *refs, n_w, bm, bk, bn, k, n, precision):
    """One (work item, n tile): out[rows, n tile] = act(x[rows, :] @ w[group, :, n tile])."""
    w_refs, o_ref = refs[:n_w], refs[n_w]
    wi, ni = pl.program_id(0), pl.program_id(1)
    rows = cnt_ref[wi]

    @pl.when(rows > 0)
    def _():
        gid, row0 = group_ref[wi], row_ref[wi]
        n0 = pl.multiple_of(ni * bn, bn)
        rmask_M = jnp.arange(bm, dtype=jnp.int32) < rows
        cmask_N = n0 + jnp.arange(bn, dtype=jnp.int32) < n
        k_tail, n_tail = k % bk != 0, n % bn != 0

        def k_step(kk, accs):
            k0 = pl.multiple_of(kk * bk, bk)
            kmask_K = k0 + jnp.arange(bk, dtype=jnp.int32) < k
            xmask = rmask_M[:, None] & kmask_K[None, :] if k_tail else rmask_M[:, None]
            x_MxK = plt.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=xmask, other=0)
            new = []
            for w_ref, acc in zip(w_refs, accs):
                w_view = w_ref.at[gid, pl.ds(k0, bk), pl.ds(n0, bn)]
                if k_tail or n_tail:
                    wmask = kmask_K[:, None] & cmask_N[None, :]
                    w_KxN = plt.load(w_view, mask=wmask, other=0)
                else:
                    w_KxN = w_view[...]
                new.append(
                    acc + jnp.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32, precision=precision)
                )
            return tuple(new)

        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(n_w))
        accs = jax.lax.fori_loop(0, common.pl_cdiv(k, bk), k_step, zeros)
        out_MxN = accs[0] if n_w == 1 else common.silu_mul(*accs)
        plt.store(
            o_ref.at[pl.ds(row0, bm), pl.ds(n0, bn)],
            out_MxN.astype(o_ref.dtype),
            mask=rmask_M[:, None] & cmask_N[None, :],
        )


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks", "num_warps", "num_stages"))
def gmm_triton(
    lhs_MxK, rhs_ws, group_sizes_G, *, out_dtype=None, interpret=False, blocks=None, num_warps=4, num_stages=3
):
    """Grouped matmul (rhs_ws = (rhs_GxKxN,)) or fused SwiGLU up (rhs_ws = (w_gate, w_up)).

    Returns [m, n] in out_dtype (default lhs dtype); rows past sum(group_sizes) are zero.
    """
    rhs_ws = tuple(rhs_ws)
    for w in rhs_ws:
        common.check_shapes(lhs_MxK, w, group_sizes_G)
    dtype = common.input_dtype(lhs_MxK, rhs_ws[0])
    out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
    m, k = lhs_MxK.shape
    g, _, n = rhs_ws[0].shape
    bm, bk, bn = blocks or block_sizes(m, g, k, n, interpret=interpret, n_w=len(rhs_ws))
    group_W, row_W, cnt_W = common.work_items(group_sizes_G, m, bm)
    grid = (group_W.shape[0], common.pl_cdiv(n, bn))
    # f32 inputs: IEEE f32 dot (Triton would otherwise use tf32); bf16 already exact products.
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, n_w=len(rhs_ws), bm=bm, bk=bk, bn=bn, k=k, n=n, precision=precision)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=grid,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"gmm_triton_w{len(rhs_ws)}",
    )(group_W, row_W, cnt_W, lhs_MxK.astype(dtype), *(w.astype(dtype) for w in rhs_ws))
    return common.zero_rows_past_total(out, group_sizes_G)
