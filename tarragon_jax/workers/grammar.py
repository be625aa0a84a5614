"""Structured outputs: the token masks of requests that ask for a grammar (SamplingParams.grammar,
an llguidance grammar: a JSON schema's, a Lark grammar, a regex), computed by llguidance on the
host of the AW that runs them, one bit per token, and applied on the device before sampling.

Why llguidance: it needs only the tokenizer's JSON (xgrammar's wheel requires torch,
transformers and triton), and it computes a mask row in ~17 µs on the demo's 2,048-token
vocabulary (docs/results.md, structured outputs). A matcher's state is a function of the grammar and the tokens it consumed,
so an AW that receives a moved request, or replays a step, rebuilds or reuses it from the
request's own output tokens: the mask, and so the token, is the same as on a failure-free run.
A request's next mask row is computed when its token is committed (the device is idle then:
on a CPU host, under the layers, the same work took ~5x longer), one row at a time (on 2 cores,
llguidance's thread pool was slower: 16 rows 0.39-0.53 ms against 0.24-0.29 ms), and a step's
rows are gathered into one array when it begins; never per layer. Host-only.
"""
from __future__ import annotations

import dataclasses
import functools

import llguidance
import numpy as np

from tarragon_jax.workers.sequence import Sequence, SeqState


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What a grammar's matcher walks: the tokenizer (its tokenizer.json text), the ids that end a
    generation (EOS: allowed once the grammar accepts, and then the only choice), and the model's
    vocabulary size (ids the tokenizer lacks are never allowed)."""
    tokenizer_json: str
    eos_ids: tuple[int, ...]
    vocab_size: int

    @property
    def mask_words(self) -> int:
        """int32 words of one row's mask: a bit per token id."""
        return (self.vocab_size + 31) // 32


def json_grammar(schema: dict) -> str:
    """The grammar of JSON text following `schema` (a JSON schema; {"type": "object"}: any
    object), compact (no whitespace between tokens: a model cannot pad it forever);
    ValueError names what llguidance does not accept."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise ValueError(f"JSON schema not usable: {e}") from None
    if error := check_grammar(grammar):
        raise ValueError(f"JSON schema not usable: {error}")
    return grammar


@functools.lru_cache(maxsize=256)
def check_grammar(grammar: str) -> str:
    """'' if llguidance accepts the grammar, else its error (for a clear 400). Cached: an API
    request's grammar is checked where its schema is read and again where the engine admits it,
    and clients send the same few schemas over and over."""
    return llguidance.LLMatcher.validate_grammar(grammar)


def _only(ids: tuple[int, ...], words: int) -> np.ndarray:
    """int32 [words]: a mask allowing just these token ids."""
    bits = np.zeros(words * 32, bool)
    bits[list(ids)] = True
    return np.packbits(bits, bitorder="little").view(np.int32)


class Grammars:
    """The matchers of one AW's requests that ask for a grammar, by request id."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.tokenizer = llguidance.LLTokenizer(vocab.tokenizer_json, n_vocab=vocab.vocab_size,
                                                eos_token=list(vocab.eos_ids))
        self._matchers: dict[int, tuple[object, int]] = {}      # request id -> (matcher, output tokens consumed)
        self._rows: dict[int, tuple[int, np.ndarray]] = {}      # request id -> (output tokens, its next mask row)

    def _matcher(self, seq: Sequence):
        """The request's matcher, having consumed exactly its output tokens so far."""
        m, n = self._matchers.get(seq.request_id, (None, 0))
        if m is None or n > len(seq.output):       # new here (or moved here), or its output restarted
            m, n = llguidance.LLMatcher(self.tokenizer, seq.sampling.grammar, log_level=0), 0
        if n < len(seq.output):
            m.consume_tokens(seq.output[n:])
        self._matchers[seq.request_id] = (m, len(seq.output))
        return m

    def _row(self, seq: Sequence) -> np.ndarray:
        """int32 [words]: the request's allowed next tokens after its output so far (kept: advance()
        computed it at the last commit). A matcher in error (it cannot be, if every token came
        through its mask) allows only EOS, so the request ends."""
        kept = self._rows.get(seq.request_id)
        if kept is not None and kept[0] == len(seq.output):
            return kept[1]
        m = self._matcher(seq)
        if m.is_error():
            row = _only(self.vocab.eos_ids, self.vocab.mask_words)
        else:
            row = np.empty(self.vocab.mask_words, np.int32)
            m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        self._rows[seq.request_id] = (len(seq.output), row)
        return row

    def advance(self, seqs: list[Sequence]) -> None:
        """After a commit: the next mask row of each unfinished request that asks, now, while the
        device is idle (the next step's masks() only gathers them)."""
        for s in seqs:
            if s.sampling.grammar is not None and s.state is not SeqState.FINISHED:
                self._row(s)

    def masks(self, seqs: list[Sequence], rows: int) -> np.ndarray | None:
        """int32 [rows, words]: each row's allowed tokens (all, for rows without a grammar), or
        None when no request of the step asks."""
        asking = [(r, s) for r, s in enumerate(seqs) if s.sampling.grammar is not None]
        if not asking:
            return None
        mask = np.full((rows, self.vocab.mask_words), -1, np.int32)
        for r, s in asking:
            mask[r] = self._row(s)
        return mask

    def release(self, request_id: int) -> None:
        self._matchers.pop(request_id, None)
        self._rows.pop(request_id, None)
