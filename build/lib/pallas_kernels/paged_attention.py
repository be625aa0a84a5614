"""Paged GQA attention over a flat ragged token batch: Pallas Triton on GPU, interpret on CPU.

    paged_attention(q [T, H, hd], k_pages/v_pages [num_pages, page_size, KV, hd],
                    tables_BxP [B, P] int32, slot_T [T], pos_T [T]) -> [T, H, hd]

Token t attends, causally, to positions 0..pos_T[t] of the sequence in block-table row
slot_T[t]: its keys live at k_pages[tables_BxP[slot_T[t], p // page_size], p % page_size].
Decode tokens and chunked-prefill tokens mix freely (the attention worker's step batch).

Why a kernel: the jnp path gathers every token's whole context into a [T, P*page_size, KV, hd]
buffer before attending; decode is bound by reading the KV cache, so that copy costs more than
the attention. The kernel reads each needed page once per (token, KV head), straight from the
page pool, through the block table.

Grid (token, KV head, split). A split covers a fixed range of PAGES_PER_SPLIT pages (flash
decoding: long contexts at small batch still fill the GPU); inside it the kernel walks blocks of
pages_per_block pages with an online softmax and stops at the token's last page, so padding and
short contexts cost nothing. The GQA group of H/KV query heads shares each K/V load (padded to
16 rows for the tensor-core dot). Splits are combined by a sequential log-sum-exp fold in jnp.

Batch invariance (what token-identical failover needs): split and block boundaries are absolute
page indices, never derived from T, B or P, and empty splits contribute exact zeros to a left
fold, so a token's output bits depend only on its own q and context, not on what else is in the
batch or how wide the block table is: a recomputed or restored request decodes the same tokens.

Backends, chosen at lowering time: cuda/rocm -> Triton (power-of-two head_dim and page_size);
cpu, tpu and other shapes -> the jnp reference (CPU cannot compile Pallas; `interpret=True` runs
the kernel there, for tests).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

PAGES_PER_SPLIT = 16                  # fixed, for batch invariance (see module docstring)
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite: exp(MASK - m) is 0, never NaN
IMPLS = ("auto", "pallas", "jnp")


def _check(q_TxHxd, k_pages, v_pages, tables_BxP, slot_T, pos_T):
    T, H, hd = q_TxHxd.shape
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[3] != hd:
        raise ValueError(f"k/v_pages must be [num_pages, page_size, KV, {hd}] and equal; "
                         f"got {k_pages.shape}, {v_pages.shape}")
    if H % k_pages.shape[2]:
        raise ValueError(f"{H} query heads are not a multiple of {k_pages.shape[2]} KV heads")
    if tables_BxP.ndim != 2 or slot_T.shape != (T,) or pos_T.shape != (T,):
        raise ValueError(f"expected tables [B, P], slot/pos [{T}]; got {tables_BxP.shape}, "
                         f"{slot_T.shape}, {pos_T.shape}")


def triton_supports(q_TxHxd, k_pages) -> bool:
    """Triton blocks need power-of-two extents: head_dim and page_size (others take the jnp path)."""
    hd, ps = q_TxHxd.shape[2], k_pages.shape[1]
    return hd >= 16 and hd & (hd - 1) == 0 and ps & (ps - 1) == 0


def pages_per_block(page_size: int) -> int:
    """Pages per inner step: >= 16 key rows for the dot, ~128 keys per step, divides a split."""
    return max(1, min(PAGES_PER_SPLIT, 128 // page_size))


def _kernel(tables_ref, slot_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
            ps, ppb, n_table, precision):
    """One (token, KV head, split): unnormalised output o, running max m and sum l per q head."""
    t, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot, pos = slot_ref[t], pos_ref[t]
    first = s * PAGES_PER_SPLIT
    last = jnp.minimum(first + PAGES_PER_SPLIT, pos // ps + 1)        # exclusive, token's own end
    q_GxD = q_ref[t, h]                                                 # [Gp, hd]
    gp, hd = q_GxD.shape
    scale = 1.0 / float(hd) ** 0.5

    def block(i, carry):
        o_GxD, m_G, l_G = carry
        p0 = first + i * ppb
        page_j = jnp.arange(ppb, dtype=jnp.int32)
        ids = plt.load(tables_ref.at[slot, pl.ds(p0, ppb)], mask=p0 + page_j < n_table, other=0)
        k_CxD = k_ref[ids, :, h, :].reshape(ppb * ps, hd)              # [ppb*ps, hd] gathered
        v_CxD = v_ref[ids, :, h, :].reshape(ppb * ps, hd)
        s_GxC = jax.lax.dot_general(q_GxD, k_CxD, (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32) * scale
        key_C = p0 * ps + jnp.arange(ppb * ps, dtype=jnp.int32)
        s_GxC = jnp.where((key_C <= pos)[None, :], s_GxC, MASK)
        m_new = jnp.maximum(m_G, jnp.max(s_GxC, axis=1))
        corr_G = jnp.exp(m_G - m_new)
        p_GxC = jnp.exp(s_GxC - m_new[:, None])
        pv = jnp.dot(p_GxC.astype(v_CxD.dtype), v_CxD, precision=precision,
                     preferred_element_type=jnp.float32)
        return o_GxD * corr_G[:, None] + pv, m_new, l_G * corr_G + jnp.sum(p_GxC, axis=1)

    init = (jnp.zeros((gp, hd), jnp.float32), jnp.full((gp,), MASK, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o_GxD, m_G, l_G = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(last - first, 0), ppb), block, init)
    o_ref[t, h, s] = o_GxD
    m_ref[t, h, s] = m_G
    l_ref[t, h, s] = l_G


def _pallas(q_TxHxd, k_pages, v_pages, tables_BxP, slot_T, pos_T, *, interpret, num_warps, num_stages):
    T, H, hd = q_TxHxd.shape
    _, ps, KV, _ = k_pages.shape
    G = H // KV
    gp = max(16, 1 << (G - 1).bit_length())
    P = tables_BxP.shape[1]
    S = -(-P // PAGES_PER_SPLIT)
    q_TxKxGxD = jnp.pad(q_TxHxd.reshape(T, KV, G, hd), ((0, 0), (0, 0), (0, gp - G), (0, 0)))
    dtype = k_pages.dtype
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, ps=ps, ppb=pages_per_block(ps), n_table=P, precision=precision)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(T, KV, S),
        out_shape=(jax.ShapeDtypeStruct((T, KV, S, gp, hd), jnp.float32),
                   jax.ShapeDtypeStruct((T, KV, S, gp), jnp.float32),
                   jax.ShapeDtypeStruct((T, KV, S, gp), jnp.float32)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention",
    )(tables_BxP.astype(jnp.int32), slot_T.astype(jnp.int32), pos_T.astype(jnp.int32),
      q_TxKxGxD.astype(dtype), k_pages, v_pages)
    return _combine(o[:, :, :, :G], m[:, :, :, :G], l[:, :, :, :G]).reshape(T, H, hd).astype(q_TxHxd.dtype)


def _combine(o_TxKxSxGxD, m_TxKxSxG, l_TxKxSxG):
    """Merge split partials with a left fold in split order (exact zeros from empty splits)."""
    m_max = jnp.max(m_TxKxSxG, axis=2)
    o_acc = jnp.zeros_like(o_TxKxSxGxD[:, :, 0])
    l_acc = jnp.zeros_like(m_max)
    for s in range(m_TxKxSxG.shape[2]):
        corr = jnp.exp(m_TxKxSxG[:, :, s] - m_max)
        o_acc = o_acc + o_TxKxSxGxD[:, :, s] * corr[..., None]
        l_acc = l_acc + l_TxKxSxG[:, :, s] * corr
    return o_acc / l_acc[..., None]


def paged_attention_reference(q_TxHxd, k_pages, v_pages, tables_BxP, slot_T, pos_T):
    """jnp oracle and the CPU/TPU path: gather each token's context; logits in q's dtype (as
    transformers' eager attention), then the masked softmax in f32."""
    T, H, hd = q_TxHxd.shape
    _, ps, KV, _ = k_pages.shape
    pages_TxP = tables_BxP[slot_T]
    C = pages_TxP.shape[1] * ps
    k_TxCxKxD = k_pages[pages_TxP].reshape(T, C, KV, hd).astype(q_TxHxd.dtype)
    v_TxCxKxD = v_pages[pages_TxP].reshape(T, C, KV, hd).astype(q_TxHxd.dtype)
    q_TxKxGxD = q_TxHxd.reshape(T, KV, H // KV, hd)
    logits = jnp.einsum("tkgd,tckd->tkgc", q_TxKxGxD, k_TxCxKxD).astype(jnp.float32)
    visible_TxC = jnp.arange(C)[None, :] <= pos_T[:, None]
    logits = jnp.where(visible_TxC[:, None, None, :], logits / jnp.sqrt(jnp.float32(hd)),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_TxCxKxD.dtype)
    return jnp.einsum("tkgc,tckd->tkgd", probs, v_TxCxKxD).reshape(T, H, hd)


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "num_warps", "num_stages"))
def paged_attention(q_TxHxd, k_pages, v_pages, tables_BxP, slot_T, pos_T, *, impl="auto",
                    interpret=False, num_warps=8, num_stages=2):
    """Causal paged GQA attention per token; returns [T, H, hd] in q's dtype.

    Launch config from compiling for sm_90 (launch/triton_check.py, bf16, hd 128, 128 keys a
    step): 8 warps x 2 stages take 128 registers, no spills, 73 KiB shared, 2 blocks (16 warps)
    per SM; 4 warps would need 232 registers and leave 8 warps per SM.

    impl: "auto" (Triton kernel on GPU, jnp on CPU/TPU, picked at lowering), "pallas" (the
      kernel everywhere: interpret mode on CPU), "jnp" (the reference everywhere).
    """
    _check(q_TxHxd, k_pages, v_pages, tables_BxP, slot_T, pos_T)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    args = (q_TxHxd, k_pages, v_pages, tables_BxP, slot_T, pos_T)
    kernel = functools.partial(_pallas, num_warps=num_warps, num_stages=num_stages)
    if impl == "jnp":
        return paged_attention_reference(*args)
    if interpret:
        return kernel(*args, interpret=True)
    on_cpu = (lambda *a: kernel(*a, interpret=True)) if impl == "pallas" else paged_attention_reference
    on_gpu = (functools.partial(kernel, interpret=False) if triton_supports(q_TxHxd, k_pages)
              else paged_attention_reference)
    return jax.lax.platform_dependent(*args, cpu=on_cpu, cuda=on_gpu, rocm=on_gpu,
                                      default=paged_attention_reference)
