from tarragon_jax.metrics import (RequestTimes, back_to, longest_dip, recovered_at, stall_around, throughput_timeline,
                                  worst_gap_after, zero_throughput_window)


def test_stall_and_zero_throughput_on_a_synthetic_timeline():
    a = RequestTimes(0.0, [0.1, 0.2, 0.3, 0.4, 1.4, 1.5])       # stalls 1.0 s across the failure at 0.45
    b = RequestTimes(0.0, [0.15, 0.25, 0.35, 0.95, 1.05])       # 0.6 s
    c = RequestTimes(1.0, [1.2, 1.3])                           # arrives after the failure: not affected
    assert abs(stall_around([a, b, c], 0.45) - (1.0 - 0.1)) < 1e-9
    assert abs(zero_throughput_window([a, b, c], 0.45) - (0.95 - 0.4)) < 1e-9
    assert throughput_timeline([a], 0.0, 0.5) == [8.0, 0.0, 2.0, 2.0]
    assert recovered_at([a, b, c], 0.45) == 1.4                 # a's next token; c was not in flight
    assert recovered_at([c], 0.45) == 0.45


def test_whole_run_figures_see_a_dip_no_request_spans():
    """A stretch of no tokens that no request in flight at the failure spans (here a late
    arrival's first token, and a 0.4 s hole at 2.0-2.4 s): the stall misses it; the worst gap,
    the dip and the time back to the failure-free throughput see it."""
    a = RequestTimes(0.0, [0.05 + 0.1 * i for i in range(20)] + [2.45 + 0.1 * i for i in range(6)])
    b = RequestTimes(1.9, [2.55, 2.65])                          # waits 0.65 s for its first token
    assert abs(worst_gap_after([a, b], 1.5) - 0.65) < 1e-9
    assert abs(worst_gap_after([a, b], 3.0) - 0.0) < 1e-9
    timeline = throughput_timeline([a, b], 0.0, 0.1)
    longest, total = longest_dip(timeline, 0.1)
    assert abs(longest - 0.4) < 1e-9 and abs(total - 0.4) < 1e-9
    assert longest_dip([0.0, 0.0, 10.0, 10.0], 0.1) == (0.0, 0.0)   # before the first token: not a dip
    reference = [10.0] * 30
    assert abs(back_to(timeline, reference, 2.0, 0.1, window_s=0.2) - 0.4) < 1e-9
    assert back_to(reference, reference, 1.0, 0.1) == 0.0
    assert back_to([10.0] * 10 + [0.0] * 20, reference, 1.0, 0.1) == float("inf")
