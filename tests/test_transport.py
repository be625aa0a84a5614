"""The step's one wait is bounded: a result that is not ready by the deadline is a WorkerFailed
naming the first worker (in dispatch order) whose output is late, and the layer; a dead worker
refuses transfers at once, as source or destination."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarragon_jax.errors import WorkerFailed
from tarragon_jax.workers.local_runtime import LocalRuntime
from tarragon_jax.workers.transport import Dispatch, Transport
from seeding import fresh_rng


def test_deadline_and_dead_worker():
    (aw,), (ew,) = LocalRuntime().workers(1, 1)
    assert aw.devices != ew.devices
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 400, lambda i, a: jnp.tanh(a @ a), x))
    x = ew.put(fresh_rng().standard_normal((384, 384), dtype=np.float32))
    t = Transport(deadline_s=1e-4)
    ready = aw.put(np.float32(1))
    y_ew = slow(x)
    y_aw, = t.send_all([(y_ew, aw, ew)])                  # no wait: the copy follows its producer
    with pytest.raises(WorkerFailed, match=r"ew0 failed: no result within the 0.000 s deadline") as e:
        t.wait({0: y_aw}, [Dispatch(aw.id, 0, ready), Dispatch(ew.id, 3, y_ew), Dispatch(aw.id, 4, y_aw)])
    assert e.value.layer == 3 and t.waits == 1 and t.pulls == 0
    ok = Transport(deadline_s=30.0)
    host = ok.wait({0: y_aw}, [Dispatch(ew.id, 3, y_ew)])
    assert isinstance(host[0], np.ndarray) and ok.pulls == 1
    assert y_aw.devices() == set(aw.devices)
    ew.alive = False
    with pytest.raises(WorkerFailed, match="ew0 failed: send to a dead worker"):
        ok.send_all([(y_aw, ew, aw)])
    with pytest.raises(WorkerFailed, match="ew0 failed: worker is dead"):
        ok.send_all([(y_ew, aw, ew)])
    assert not ew.probe() and aw.probe()
    t.close()
    ok.close()
