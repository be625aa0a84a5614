import pytest

from tarragon_jax.control.health import HealthMonitor


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_detection_latency_and_single_detection():
    clock = FakeClock()
    h = HealthMonitor(clock)
    h.killed("ew2")
    assert h.detection_latency_s("ew2") is None and not h.is_failed("ew2")
    clock.t += 0.25
    assert h.report_failure("ew2", "no result within the deadline", "deadline") is True
    clock.t += 1.0
    assert h.report_failure("ew2", "send to a dead worker", "call") is False      # same incident
    assert h.detection_latency_s("ew2") == pytest.approx(0.25)
    assert h.failed == {"ew2"} and h.is_failed("ew2")
    assert [(e.t, e.worker, e.kind) for e in h.events] == [(100.0, "ew2", "killed"), (100.25, "ew2", "failed")]
    assert h.events[1].detail == "deadline: no result within the deadline"
    assert h.detection_latency_s("aw0") is None


def test_heartbeat_reports_false_and_raising_probes_once():
    clock = FakeClock()
    h = HealthMonitor(clock)
    calls = []

    def boom():
        raise RuntimeError("device lost")

    def probe(name, ok):
        return lambda: calls.append(name) or ok

    probes = {"aw0": probe("aw0", True), "ew0": probe("ew0", False), "ew1": boom}
    assert h.heartbeat(probes) == ["ew0", "ew1"]
    assert h.failed == {"ew0", "ew1"}
    assert "probe raised RuntimeError: device lost" in h.events[-1].detail
    assert h.events[-1].detail.startswith("heartbeat: ")
    calls.clear()
    assert h.heartbeat(probes) == [] and calls == ["aw0"]                         # dead ones not probed


def test_revive_and_second_incident():
    clock = FakeClock()
    h = HealthMonitor(clock)
    h.killed("aw1")
    clock.t += 0.01
    h.report_failure("aw1", "x", "heartbeat")
    clock.t += 5.0
    h.revive("aw1")
    assert not h.is_failed("aw1") and h.detection_latency_s("aw1") == pytest.approx(0.01)
    h.killed("aw1")                                    # new incident: old detection forgotten
    assert h.detection_latency_s("aw1") is None
    clock.t += 0.5
    assert h.report_failure("aw1", "y", "call") is True
    assert h.detection_latency_s("aw1") == pytest.approx(0.5)
    assert [e.kind for e in h.events] == ["killed", "failed", "revived", "killed", "failed"]


def test_monitors_are_independent():
    a, b = HealthMonitor(FakeClock()), HealthMonitor(FakeClock())
    a.report_failure("ew0", "x", "call")
    assert b.failed == frozenset() and b.events == []


def test_implicit_heartbeats():
    t = [0.0]
    h = HealthMonitor(clock=lambda: t[0])
    assert h.silent_for("ew1") == float("inf")
    h.heard_from("ew1")
    t[0] = 0.25
    assert h.silent_for("ew1") == 0.25
