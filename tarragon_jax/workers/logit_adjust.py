"""The host side of a step's logit adjustments (SamplingParams' logit_bias and penalties): the
per-row arrays `sampling.adjust` reads, built only for a step where some request asks, from the
request's own tokens, so a request moved to another AW, or replayed, is adjusted alike.
Host-only."""
from __future__ import annotations

import numpy as np

from tarragon_jax.workers.sequence import Sequence

MIN_ENTRIES = 64          # smallest entries bucket (entries per row: bias tokens, then prompt / output tokens)
GROWTH = 4                # each bucket this many times the last: few programs to precompile, little padding moved


def entries_bucket(n: int) -> int:
    """The entries bucket that holds n: MIN_ENTRIES x a power of GROWTH."""
    L = MIN_ENTRIES
    while L < n:
        L *= GROWTH
    return L


def entries_buckets(largest: int) -> tuple[int, ...]:
    """Every entries bucket a row of up to `largest` entries can need (for precompiling)."""
    out = [MIN_ENTRIES]
    while out[-1] < largest:
        out.append(out[-1] * GROWTH)
    return tuple(out)


def _entries(seq: Sequence) -> tuple[list[int], list[float], list[float]]:
    """(token ids, counts, biases) of one request: its bias tokens (count -1: no history), then
    the tokens its penalties look at: prompt (count 0) and output (count 1) for the repetition
    penalty, the output for frequency / presence."""
    sp = seq.sampling
    ids = [t for t, _ in sp.logit_bias]
    counts, bias = [-1.0] * len(ids), [float(b) for _, b in sp.logit_bias]
    if sp.repetition_penalty != 1:
        ids += seq.prompt
        counts += [0.0] * len(seq.prompt)
    if sp.repetition_penalty != 1 or sp.frequency_penalty != 0 or sp.presence_penalty != 0:
        ids += seq.output
        counts += [1.0] * len(seq.output)
    return ids, counts, bias + [0.0] * (len(ids) - len(bias))


def adjust_inputs(seqs: list[Sequence], rows: int, vocab_size: int) -> tuple[np.ndarray, ...] | None:
    """(ids [R, L] int32 (vocab_size pads), counts [R, L] f32, biases [R, L] f32, penalties [R, 3]
    f32: repetition, frequency, presence) for a step's R rows (padding rows and requests that ask
    nothing: no entries, penalties 1, 0, 0), or None when no request of the step asks."""
    if not any(s.sampling.adjusts_logits for s in seqs):
        return None
    per_row = [_entries(s) if s.sampling.adjusts_logits else ([], [], []) for s in seqs]
    L = entries_bucket(max(len(ids) for ids, _, _ in per_row))
    ids_RxL = np.full((rows, L), vocab_size, np.int32)
    counts_RxL, bias_RxL = np.full((rows, L), -1.0, np.float32), np.zeros((rows, L), np.float32)
    pen_Rx3 = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (rows, 1))
    for r, (s, (ids, counts, bias)) in enumerate(zip(seqs, per_row)):
        ids_RxL[r, :len(ids)], counts_RxL[r, :len(ids)], bias_RxL[r, :len(ids)] = ids, counts, bias
        sp = s.sampling
        pen_Rx3[r] = sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty
    return ids_RxL, counts_RxL, bias_RxL, pen_Rx3
