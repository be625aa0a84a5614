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


def stall_around(requests: list[RequestTimes], t_fail: float) -> float:
    """Longest inter-token gap spanning the failure among requests in flight at that moment,
    minus the median inter-token gap of everything before it (the paper's stall)."""
    before = [g for r in requests for a, b in zip(r.token_s, r.token_s[1:]) if b <= t_fail for g in [b - a]]
    spanning = []
    for r in requests:
        prev = [t for t in r.token_s if t <= t_fail]
        after = [t for t in r.token_s if t > t_fail]
        if after and (prev or r.submit_s <= t_fail):
            spanning.append(after[0] - (prev[-1] if prev else r.submit_s))
    if not spanning:
        return 0.0
    base = float(sorted(before)[len(before) // 2]) if before else 0.0
    return max(spanning) - base


def recovered_at(requests: list[RequestTimes], t_fail: float) -> float:
    """When every request in flight at the failure had its next token: the end of the window in
    which the failure can have cost anything (t_fail if none was in flight)."""
    firsts = [next(t for t in r.token_s if t > t_fail) for r in requests
              if r.submit_s <= t_fail and any(t > t_fail for t in r.token_s)]
    return max(firsts, default=t_fail)


def zero_throughput_window(requests: list[RequestTimes], t_fail: float) -> float:
    """Time from the last token emitted (by anyone) before the failure to the first one after."""
    times = sorted(t for r in requests for t in r.token_s)
    prev = [t for t in times if t <= t_fail]
    after = [t for t in times if t > t_fail]
    if not after:
        return float("inf")
    return after[0] - (prev[-1] if prev else t_fail)


def throughput_timeline(requests: list[RequestTimes], t0: float, bucket_s: float) -> list[float]:
    """Tokens per second in consecutive buckets from t0."""
    times = [t - t0 for r in requests for t in r.token_s]
    if not times:
        return []
    counts = [0] * (int(max(times) / bucket_s) + 1)
    for t in times:
        counts[int(t / bucket_s)] += 1
    return [c / bucket_s for c in counts]


# ---- whole-run figures: what a request saw over the run, not only across the failure instant --------
def worst_gap_after(requests: list[RequestTimes], t: float) -> float:
    """The longest wait for a next token that ended after t: a first token counts from the
    request's submission (a request queued behind a stall waits too). Over the whole run with t
    its start."""
    gaps = [b - a for r in requests for a, b in zip([r.submit_s] + r.token_s, r.token_s) if b > t]
    return max(gaps, default=0.0)


def longest_dip(timeline: list[float], bucket_s: float, fraction: float = 0.1) -> tuple[float, float]:
    """(longest stretch, total time) below `fraction` of the median throughput, between the first
    and the last token (timeline: tokens/s per bucket from the run's start; buckets before the
    first token are not counted). A compile on the serving thread shows here as a stretch near
    zero however few requests span it, which the stall around the failure instant may not."""
    first = next((i for i, v in enumerate(timeline) if v > 0), len(timeline))
    span = timeline[first:]
    if not span:
        return 0.0, 0.0
    floor = fraction * sorted(span)[len(span) // 2]
    longest = run = below = 0
    for v in span:
        run = run + 1 if v < floor else 0
        below += v < floor
        longest = max(longest, run)
    return longest * bucket_s, below * bucket_s


def back_to(timeline: list[float], reference: list[float], t_fail: float, bucket_s: float,
            fraction: float = 0.9, window_s: float = 0.5) -> float:
    """Seconds from the failure until throughput is back to `fraction` of the failure-free run's
    (same workload, timelines from the same first arrival): the start of the first `window_s` of
    buckets after the failure with at least that fraction of the reference's tokens. 0 if it
    never fell below; inf if it never came back."""
    w, start = max(1, round(window_s / bucket_s)), int(t_fail / bucket_s + 1e-9)
    ends = max(len(timeline), len(reference))
    pad = lambda xs: xs + [0.0] * (ends - len(xs))
    run, ref = pad(list(timeline)), pad(list(reference))
    for b in range(start, ends):
        want = sum(ref[b:b + w])
        if want == 0 or sum(run[b:b + w]) >= fraction * want:
            return max(0.0, (b - start) * bucket_s)
    return float("inf")
