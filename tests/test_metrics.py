from tarragon_jax.metrics import RequestTimes, recovered_at, stall_around, throughput_timeline, zero_throughput_window


def test_stall_and_zero_throughput_on_a_synthetic_timeline():
    a = RequestTimes(0.0, [0.1, 0.2, 0.3, 0.4, 1.4, 1.5])       # stalls 1.0 s across the failure at 0.45
    b = RequestTimes(0.0, [0.15, 0.25, 0.35, 0.95, 1.05])       # 0.6 s
    c = RequestTimes(1.0, [1.2, 1.3])                           # arrives after the failure: not affected
    assert abs(stall_around([a, b, c], 0.45) - (1.0 - 0.1)) < 1e-9
    assert abs(zero_throughput_window([a, b, c], 0.45) - (0.95 - 0.4)) < 1e-9
    assert throughput_timeline([a], 0.0, 0.5) == [8.0, 0.0, 2.0, 2.0]
    assert recovered_at([a, b, c], 0.45) == 1.4                 # a's next token; c was not in flight
    assert recovered_at([c], 0.45) == 0.45
