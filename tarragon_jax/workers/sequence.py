"""One request's token history and cache progress. Host-only."""
from __future__ import annotations

import dataclasses
import enum

from tarragon_jax.config import SamplingParams
from tarragon_jax.kv.prefix_hash import extend_hashes


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens' (id, logprob), best first."""
    logprob: float
    top: tuple[tuple[int, float], ...]


def step_logprob(out: dict, row: int, n: int, key: str = "logprobs") -> TokenLogprob:
    """Row `row` of a step's host output (AttentionWorker.head: out[key] = chosen [R], top ids
    [R, K], top logprobs [R, K]) with its n best."""
    chosen_R, ids_RxK, lps_RxK = out[key]
    return TokenLogprob(float(chosen_R[row]), tuple(zip(ids_RxK[row, :n].tolist(), lps_RxK[row, :n].tolist())))


def emit(seq: "Sequence", out: dict, row: int) -> tuple["Sequence", int, bool]:
    """Append row `row`'s sampled token of a step's host output to `seq`, with its logprobs where
    the request asks and the output carries them: (seq, token, is_new_to_the_user)."""
    tok = int(out["tokens"][row])
    lp = step_logprob(out, row, seq.sampling.logprobs) if seq.sampling.logprobs is not None and "logprobs" in out \
        else None
    return seq, tok, seq.append(tok, lp)


def prompt_positions(chunks: list[tuple["Sequence", int, int]]) -> list[tuple["Sequence", int, int]]:
    """The prompt tokens a step scores for requests that ask for prompt logprobs: (request,
    token row in the step, position p of the scored token, given the tokens before it) for each
    chunk (request, first position, tokens) in row order, skipping positions already scored (a
    moved request recomputes some again)."""
    out, t = [], 0
    for s, start, n in chunks:
        if s.sampling.prompt_logprobs is not None:
            out += [(s, t + p - 1 - start, p) for p in range(max(start + 1, len(s.prompt_logprobs) + 1),
                                                          min(start + n + 1, len(s.prompt)))]
        t += n
    return out


def record_prompt_logprobs(out: dict, seqs: dict[int, "Sequence"]) -> None:
    """Each prompt token the step scored (out["scored"]: (request id, position) per row of
    out["prompt_logprobs"]) onto its request, if it is still here and lacks it."""
    for j, (rid, p) in enumerate(out.get("scored", ())):
        s = seqs.get(int(rid))
        if s is not None and p == len(s.prompt_logprobs) + 1:
            s.prompt_logprobs.append(step_logprob(out, j, s.sampling.prompt_logprobs, "prompt_logprobs"))


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Sequence:
    request_id: int
    prompt: list[int]
    sampling: SamplingParams
    max_len: int                          # prompt + new tokens, capped at the model context
    output: list[int] = dataclasses.field(default_factory=list)
    num_cached: int = 0                   # leading tokens whose KV is in the AW's cache
    state: SeqState = SeqState.WAITING
    finish_reason: str = ""
    restore_pending: bool = False         # moved to a new AW: restore committed KV on admission
    recompute_until: int = 0              # positions below this are recomputed in one chunked pass
    replay: list[int] = dataclasses.field(default_factory=list)   # restart_regenerate: tokens to redo silently
    hashes: list[int] = dataclasses.field(default_factory=list)   # chained hashes of its full blocks (prefix cache)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)   # one per output token, if asked
    prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # prompt tokens 1.., if asked
    prefix_hint: int = 0                  # leading blocks another AW caches: its AW reads them from the store

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def block_hashes(self, page_size: int, salt: bytes) -> list[int]:
        """The chained hashes of its full blocks (kv/prefix_hash.py), extended as blocks fill and
        kept on it: the driver's router and its AW both ask, every step of a decode."""
        if len(self.hashes) < self.num_tokens // page_size:
            extend_hashes(self.hashes, self.tokens, page_size, salt)
        return self.hashes

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the prompt remainder in prefill, the last token in decode."""
        return self.num_tokens - self.num_cached

    def append(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a generated token (and its logprobs, when the request asks); False when it
        regenerates one the user already has (restart_regenerate)."""
        self.output.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if len(self.output) <= len(self.replay):
            if token != self.replay[len(self.output) - 1]:
                raise AssertionError(f"request {self.request_id}: regenerated token {token} differs from "
                                     f"{self.replay[len(self.output) - 1]} at index {len(self.output) - 1}")
            return False
        if token in self.sampling.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.sampling.max_new_tokens:
            self.finish_reason = "max_new_tokens"
        elif self.num_tokens >= self.max_len:
            self.finish_reason = "length"
        if self.finish_reason:
            self.state = SeqState.FINISHED
        return True

    def reprefill(self) -> None:
        """Restart baseline: the cache is lost; the prompt and the tokens already sent are
        prefilled again in chunked passes (as a moved request recomputes), then decoding goes on."""
        self.num_cached, self.recompute_until, self.prefix_hint = 0, self.num_tokens - 1, 0
        self.state, self.restore_pending = SeqState.WAITING, False

    def regenerate(self) -> None:
        """restart_regenerate, the weaker baseline: every position is lost and the sent tokens are
        generated again one step at a time before new ones reach the user."""
        self.replay = list(self.output)
        self.output, self.logprobs, self.num_cached, self.recompute_until = [], [], 0, 0
        self.hashes, self.prefix_hint = [], 0
        self.state, self.restore_pending = SeqState.WAITING, False

    def move(self) -> None:
        """Tarragon: the request moves to another AW, restores what was committed, recomputes the rest."""
        self.num_cached, self.state, self.restore_pending = 0, SeqState.WAITING, True
