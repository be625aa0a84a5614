"""Every cross-worker wait is bounded: a result that is not ready by the deadline is a
WorkerFailed naming the worker, and a dead worker refuses transfers at once."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarragon_jax.errors import WorkerFailed
from tarragon_jax.runtime import LocalRuntime
from tarragon_jax.transport import Transport


def test_deadline_and_dead_worker():
    (aw,), (ew,) = LocalRuntime().workers(1, 1)
    assert aw.devices != ew.devices
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 400, lambda i, a: jnp.tanh(a @ a), x))
    x = ew.put(np.random.default_rng().standard_normal((384, 384), dtype=np.float32))
    t = Transport(deadline_s=1e-4)
    with pytest.raises(WorkerFailed, match=r"ew0 failed: no result within the 0.000 s deadline"):
        t.wait(slow(x), ew)
    ok = Transport(deadline_s=30.0)
    y = ok.send(ok.wait(slow(x), ew), aw)
    assert y.devices() == set(aw.devices)
    ew.alive = False
    with pytest.raises(WorkerFailed, match="ew0 failed: send to a dead worker"):
        ok.send(y, ew)
    assert not ew.probe() and aw.probe()
    t.close()
    ok.close()
