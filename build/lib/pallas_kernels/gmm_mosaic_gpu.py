"""Grouped matmul for Hopper (sm_90) in Pallas Mosaic GPU: persistent kernel, TMA + wgmma pipeline.

One CTA per SM loops (nd_loop over "sm") over (work item, n tile) pairs; a work item is a row
tile inside one group (gmm_common), so each group's weights are streamed from global memory
once per n tile. Per pair, emit_pipeline streams k tiles of x [bm, bk] and w [bk, bn] into
shared memory with TMA (max_concurrent_steps in flight) and issues wgmma into a register
accumulator. Whole-weight BlockSpecs would stage [k, n] in shared memory (MBs; the limit is
~227 KiB), so the weights stay in GMEM and only k-tiles are copied.

Mosaic's layout inference needs the x tile's GMEM row offset to be a multiple of 8, so a work
item covers at most ITEM_ROWS = BM - 8 = 56 rows starting anywhere: its x box starts at the
row rounded down to 8 and holds the group's rows at smem offset row0 % 8. Rows outside the
group are computed but never stored: the result goes out through a ladder of TMA stores of
2^i rows (32, 16, ..., 1) chosen at run time from the row count, so neighbouring groups' rows
are never overwritten. Two weight refs (gate, up) give the fused SwiGLU up-projection.
bf16/f16 only (wgmma); k % bk == 0 and n % bn == 0 (callers fall back to Triton otherwise).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import gmm_common as common

BM = 64  # one warpgroup's wgmma M; decode groups hold 1-64 tokens.
ROW_ALIGN = 8  # x box GMEM row offsets must be provably 8-aligned for layout inference
ITEM_ROWS = BM - ROW_ALIGN  # rows per work item: off (< 8) + rows always fits in the box


def supports(lhs_MxK, rhs_GxKxN, *, bk=64, bn=128) -> bool:
    """Whether this kernel handles the shapes/dtypes (else use gmm_triton)."""
    _, k, n = rhs_GxKxN.shape
    return (
        jnp.dtype(rhs_GxKxN.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and k % bk == 0
        and n % bn == 0
    )


def _body(group_gmem, row_gmem, cnt_gmem, x_gmem, *refs, n_w, bk, bn, k, n, m, num_items, steps, grid_tile_n):
    w_gmems, o_gmem = refs[:n_w], refs[n_w]
    n_tiles = n // bn

    @plgpu.nd_loop((num_items * n_tiles,), collective_axes="sm")
    def _pair_loop(loop_info: plgpu.NDLoopInfo):
        # Snake over (work item, n tile) so neighbouring CTAs share x rows in L2.
        wi, ni = plgpu.planar_snake(loop_info.index[0], (num_items, n_tiles), 1, grid_tile_n)
        rows = cnt_gmem[wi]

        @pl.when(rows > 0)
        def _():
            gid, row0 = group_gmem[wi], row_gmem[wi]
            row_al = pl.multiple_of(row0 // ROW_ALIGN * ROW_ALIGN, ROW_ALIGN)
            off = row0 - row_al  # first row of the group inside the x box / accumulator

            def acc_scope(*acc_refs):
                def k_step(_, x_smem, *w_smems):
                    for acc_ref, w_smem in zip(acc_refs, w_smems):
                        plgpu.wgmma(acc_ref, x_smem, w_smem)

                plgpu.emit_pipeline(
                    k_step,
                    grid=(k // bk,),
                    in_specs=[plgpu.BlockSpec((BM, bk), lambda kk: (0, kk), delay_release=1)]
                    + [plgpu.BlockSpec((bk, bn), lambda kk: (kk, ni), delay_release=1)] * n_w,
                    max_concurrent_steps=steps,
                )(x_gmem.at[pl.ds(row_al, BM)], *(w.at[gid] for w in w_gmems))
                return tuple(a[...] for a in acc_refs)

            accs = pl.run_scoped(acc_scope, *(plgpu.ACC((BM, bn)) for _ in range(n_w)))
            out_MxN = accs[0] if n_w == 1 else common.silu_mul(*accs)

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((BM, bn), o_gmem.dtype))
            def _store(o_smem):
                o_smem[...] = out_MxN.astype(o_smem.dtype)
                plgpu.commit_smem()
                # TMA boxes are static: store `rows` (1..ITEM_ROWS, dynamic) as power-of-two boxes.
                done = 0  # rows already stored
                chunk = 1 << int(math.log2(min(ITEM_ROWS, m)))
                while chunk >= 1:

                    @pl.when((rows & chunk) != 0)
                    def _(done=done, chunk=chunk):
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[pl.ds(off + done, chunk)],
                            o_gmem.at[pl.ds(row0 + done, chunk), pl.ds(ni * bn, bn)],
                        )

                    done = done + (rows & chunk)
                    chunk //= 2
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "bk", "bn", "steps", "num_sms", "grid_tile_n", "interpret")
)
def gmm_mosaic_gpu(
    lhs_MxK,
    rhs_ws,
    group_sizes_G,
    *,
    out_dtype=None,
    bk=64,
    bn=128,
    steps=4,
    num_sms=None,
    grid_tile_n=4,
    interpret=None,
):
    """Grouped matmul (rhs_ws = (rhs_GxKxN,)) or fused SwiGLU up (rhs_ws = (w_gate, w_up)).

    Returns [m, n] in out_dtype (default lhs dtype); rows past sum(group_sizes) are zero.
    interpret: None, or Mosaic GPU's interpreter params (simulates SMEM/TMA/barriers on CPU; slow,
    for tests only).
    """
    rhs_ws = tuple(rhs_ws)
    for w in rhs_ws:
        common.check_shapes(lhs_MxK, w, group_sizes_G)
        if not supports(lhs_MxK, w, bk=bk, bn=bn):
            raise ValueError(
                f"gmm_mosaic_gpu needs bf16/f16 weights, k % {bk} == 0, n % {bn} == 0;"
                f" got {w.dtype} {w.shape}"
            )
    dtype = common.input_dtype(lhs_MxK, rhs_ws[0])
    out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
    m, k = lhs_MxK.shape
    g, _, n = rhs_ws[0].shape
    x_MxK = lhs_MxK.astype(dtype)
    if m < BM:  # the x TMA box is BM rows; rows past m in a box are zero-filled by TMA
        x_MxK = jnp.pad(x_MxK, ((0, BM - m), (0, 0)))
    group_W, row_W, cnt_W = common.work_items(group_sizes_G, m, ITEM_ROWS)
    num_items = group_W.shape[0]
    grid_tile_n = math.gcd(grid_tile_n, n // bn)
    body = functools.partial(
        _body,
        n_w=len(rhs_ws),
        bk=bk,
        bn=bn,
        k=k,
        n=n,
        m=m,
        num_items=num_items,
        steps=steps,
        grid_tile_n=grid_tile_n,
    )
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_sms or common.default_num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    out = kernel(group_W, row_W, cnt_W, x_MxK, *rhs_ws)
    return common.zero_rows_past_total(out, group_sizes_G)
