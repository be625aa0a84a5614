import pytest

from tarragon_jax.control.faults import FaultInjector, FaultSpec, parse_fault


@pytest.mark.parametrize("text,spec", [
    ("ew:2@step=40", FaultSpec("ew", 2, step=40)),
    ("aw:0@step=80", FaultSpec("aw", 0, step=80)),
    ("ew:1@step=12,layer=1", FaultSpec("ew", 1, step=12, layer=1)),
    (" aw:1@prefill ", FaultSpec("aw", 1, phase="prefill")),
    ("ew:3@recovery", FaultSpec("ew", 3, phase="recovery")),
])
def test_parse_round_trips(text, spec):
    assert parse_fault(text) == spec
    assert parse_fault(str(spec)) == spec
    assert spec.worker == f"{spec.kind}{spec.index}"


@pytest.mark.parametrize("text,named", [
    ("ew2@step=4", "'ew2'"),
    ("gpu:1@step=4", "'gpu:1'"),
    ("ew:x@step=4", "index 'x'"),
    ("ew:-1@step=4", "index '-1'"),
    ("ew:1", "no '@'"),
    ("ew:1@step=four", "step value 'four'"),
    ("ew:1@layer=2", "names no step"),
    ("ew:1@step=2,when=3", "'when=3'"),
    ("ew:1@step=2,step=3", "'step' is given twice"),
    ("aw:0@decode", "'decode'"),
])
def test_parse_errors_name_the_bad_part(text, named):
    with pytest.raises(ValueError) as info:
        parse_fault(text)
    msg = str(info.value)
    assert named in msg and "accepted forms" in msg and "ew:1@step=12,layer=1" in msg


def test_spec_validates():
    with pytest.raises(ValueError, match="no step or layer"):
        FaultSpec("aw", 0, step=3, phase="prefill")
    with pytest.raises(ValueError, match="needs step"):
        FaultSpec("ew", 0)
    with pytest.raises(ValueError, match="kind"):
        FaultSpec("xw", 0, step=1)


def _run(inj, steps, n_layers=2, prefill=lambda s: set(), recovering=lambda s: False):
    """Drive the injector like the engine: start of step, then each layer; returns firing points."""
    fired = []
    for s in range(steps):
        for layer in [None] + list(range(n_layers)):
            for spec in inj.due(s, layer, prefill_aws=prefill(s), recovering=recovering(s)):
                fired.append((s, layer, str(spec)))
    return fired


def test_step_and_layer_specs_fire_once_at_their_point():
    inj = FaultInjector.from_strings(["ew:2@step=3", "ew:1@step=3,layer=1", "aw:0@step=5"])
    assert len(inj.pending) == 3
    fired = _run(inj, 8)
    assert fired == [(3, None, "ew:2@step=3"), (3, 1, "ew:1@step=3,layer=1"), (5, None, "aw:0@step=5")]
    assert inj.pending == [] and [f[2] for f in inj.fired] == [parse_fault(f[2]) for f in fired]


def test_missed_point_fires_at_next_call():
    inj = FaultInjector.from_strings(["ew:0@step=2,layer=5", "aw:1@step=1"])
    assert inj.due(0, None, prefill_aws=set(), recovering=False) == []
    assert inj.due(3, None, prefill_aws=set(), recovering=False) == [parse_fault("ew:0@step=2,layer=5"),
                                                                     parse_fault("aw:1@step=1")]
    assert inj.due(3, None, prefill_aws=set(), recovering=False) == []


def test_prefill_specs():
    inj = FaultInjector.from_strings(["aw:1@prefill", "ew:0@prefill"])
    prefill = {2: {0}, 4: {1}, 5: {1}}
    fired = _run(inj, 7, prefill=lambda s: prefill.get(s, set()))
    assert fired == [(2, None, "ew:0@prefill"), (4, None, "aw:1@prefill")]


def test_recovery_spec():
    inj = FaultInjector([FaultSpec("ew", 3, phase="recovery")])
    fired = _run(inj, 6, recovering=lambda s: s >= 4)
    assert fired == [(4, None, "ew:3@recovery")] and inj.pending == []


def test_injectors_are_independent():
    a, b = FaultInjector.from_strings(["ew:0@step=0"]), FaultInjector.from_strings(["ew:0@step=0"])
    assert len(a.due(0, None, prefill_aws=set(), recovering=False)) == 1
    assert len(b.due(0, None, prefill_aws=set(), recovering=False)) == 1


def test_a_fault_added_while_running_fires_at_its_point():
    inj = FaultInjector([])
    assert inj.due(3, None) == []
    inj.add(parse_fault("ew:1@step=4,layer=1"))
    assert inj.due(4, 0) == [] and inj.due(4, 1) == [parse_fault("ew:1@step=4,layer=1")]
    assert inj.pending == []
