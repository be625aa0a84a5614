"""Per-request timings (TTFT, every inter-token gap) and step counters. Passed in, never global."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable


@dataclasses.dataclass
class RequestTimes:
    submit_s: float
    token_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def ttft_s(self) -> float | None:
        return self.token_s[0] - self.submit_s if self.token_s else None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_s, self.token_s[1:])]


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.requests: dict[int, RequestTimes] = {}
        self.steps = 0
        self.tokens_out = 0

    def submitted(self, request_id: int) -> None:
        self.requests[request_id] = RequestTimes(self.clock())

    def token(self, request_id: int) -> None:
        self.requests[request_id].token_s.append(self.clock())
        self.tokens_out += 1

    def throughput(self) -> float:
        """Output tokens per second from the first submission to the last token."""
        firsts = [r.submit_s for r in self.requests.values()]
        lasts = [r.token_s[-1] for r in self.requests.values() if r.token_s]
        if not lasts:
            return 0.0
        return self.tokens_out / max(max(lasts) - min(firsts), 1e-9)
