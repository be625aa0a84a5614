"""One request's token history and cache progress. Host-only."""
from __future__ import annotations

import dataclasses
import enum

from tarragon_jax.config import SamplingParams


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

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the prompt remainder in prefill, the last token in decode."""
        return self.num_tokens - self.num_cached

    def append(self, token: int) -> None:
        self.output.append(token)
        if token in self.sampling.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.sampling.max_new_tokens:
            self.finish_reason = "max_new_tokens"
        elif self.num_tokens >= self.max_len:
            self.finish_reason = "length"
        if self.finish_reason:
            self.state = SeqState.FINISHED
