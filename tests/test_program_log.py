import jax
import numpy as np

from tarragon_jax.workers.program_log import ProgramLog
from tarragon_jax.workers.runtime import LocalRuntime


def test_logs_compiled_shapes_and_replays_them_on_another_worker():
    @jax.jit
    def f(x, y):
        return x @ y + 1.0

    (a,), (b,) = LocalRuntime().workers(1, 1)
    log = ProgramLog()
    rng = np.random.default_rng()
    x, y = a.put(rng.standard_normal((5, 3), dtype=np.float32)), a.put(rng.standard_normal((3, 2), dtype=np.float32))
    np.testing.assert_allclose(log.call(f, x, y), np.asarray(x) @ np.asarray(y) + 1.0, rtol=1e-6)
    log.call(f, x, y)                                         # cached: nothing new to log
    assert log.replay(a) == 1
    before = f._cache_size()
    other = ProgramLog()
    other.extend(log)
    assert other.replay(b) == 1 and f._cache_size() == before + 1   # compiled for b's device
