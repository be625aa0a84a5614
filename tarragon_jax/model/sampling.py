"""Token selection on device: greedy, or temperature / top-p with a key derived from
(request seed, token index), so a request samples the same tokens on whichever AW runs it."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tarragon_jax.config import MAX_LOGPROBS


def _one(logits_V, temperature, top_p, seed, index):
    greedy = jnp.argmax(logits_V).astype(jnp.int32)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    scaled = logits_V / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(scaled)
    order = jnp.argsort(-probs)
    sorted_p = probs[order]
    keep_sorted = (jnp.cumsum(sorted_p) - sorted_p) < top_p         # always keeps the top token
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    sampled = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf)).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@jax.jit
def sample(logits_BxV: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array, seed_B: jax.Array,
           index_B: jax.Array) -> jax.Array:
    """int32 [B] next tokens. The sampling path (a sort of the vocabulary per row) runs only when
    some row samples: an all-greedy batch, the common case, is one argmax."""
    greedy = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(temperature_B > 0),
                        lambda: jax.vmap(_one)(logits_BxV, temperature_B, top_p_B, seed_B, index_B),
                        lambda: greedy)


@jax.jit
def adjust(logits_BxV: jax.Array, ids_BxL: jax.Array, counts_BxL: jax.Array, bias_BxL: jax.Array,
           penalties_Bx3: jax.Array) -> jax.Array:
    """f32 logits after each row's logit_bias and penalties (SamplingParams), in vLLM's order:
    bias, then repetition, frequency and presence. Each row's entries (ids_BxL; V pads and is
    dropped) are its bias tokens (bias_BxL), and its prompt and output tokens (counts_BxL: 1 for
    an output token, 0 for a prompt token; the bias entries' value is -1: neither). A row with
    no entries and penalties (1, 0, 0) keeps its logits bit for bit: a request's tokens never
    depend on who else asks."""
    B, V = logits_BxV.shape
    rows = jnp.arange(B)[:, None]
    x = logits_BxV.astype(jnp.float32).at[rows, ids_BxL].add(bias_BxL, mode="drop")
    seen = jnp.zeros((B, V), jnp.bool_).at[rows, ids_BxL].max(counts_BxL >= 0, mode="drop")
    counts = jnp.zeros((B, V), jnp.float32).at[rows, ids_BxL].add(jnp.maximum(counts_BxL, 0), mode="drop")
    rep, freq, pres = (penalties_Bx3[:, i:i + 1] for i in range(3))
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    return x - freq * counts - pres * (counts > 0)


@jax.jit
def constrain(logits_BxV: jax.Array, mask_BxW: jax.Array) -> jax.Array:
    """The logits with every token whose bit is clear in its row's mask (int32 [B, ceil(V/32)],
    bit v % 32 of word v // 32; workers/grammar.py) set to -inf. A row whose bits are all set
    keeps its logits bit for bit."""
    B, V = logits_BxV.shape
    bits_BxWx32 = jnp.right_shift(mask_BxW[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1   # no gather
    allowed = bits_BxWx32.reshape(B, -1)[:, :V].astype(jnp.bool_)
    return jnp.where(allowed, logits_BxV, -jnp.inf)


LOGPROB_KS = (1, 5, MAX_LOGPROBS)  # alternatives computed: the step's most asked, rounded up to one of
                                   # these (XLA's CPU top-k costs about k: at [64, 2048] k=20 took
                                   # 0.87 ms, k=5 0.30 ms)


def logprob_k(asked: int, vocab_size: int) -> int:
    """How many alternatives to compute for a step whose requests ask for at most `asked`."""
    return min(next(k for k in LOGPROB_KS if k >= max(asked, 1)), vocab_size)


@functools.partial(jax.jit, static_argnames="k")
def logprobs(logits_BxV: jax.Array, tokens_B: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The log-probabilities (f32 log-softmax of the logits the tokens were chosen from, before
    temperature) of the chosen tokens [B], and the k most likely tokens [B, k] and theirs [B, k].
    Dispatched with the step's sampling only when some request asks; they come back in the
    step's one wait."""
    lp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    chosen_B = jnp.take_along_axis(lp_BxV, tokens_B[:, None], axis=1)[:, 0]
    top_lp_BxK, top_ids_BxK = jax.lax.top_k(lp_BxV, k)
    return chosen_B, top_ids_BxK.astype(jnp.int32), top_lp_BxK
