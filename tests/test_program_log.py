import time

import jax
import numpy as np

from tarragon_jax.workers.program_log import CompileLog, ProgramLog
from tarragon_jax.workers.local_runtime import LocalRuntime
from seeding import fresh_rng


def test_logs_compiled_shapes_and_replays_them_on_another_worker():
    @jax.jit
    def f(x, y):
        return x @ y + 1.0

    (a,), (b,) = LocalRuntime().workers(1, 1)
    log = ProgramLog()
    rng = fresh_rng()
    x, y = a.put(rng.standard_normal((5, 3), dtype=np.float32)), a.put(rng.standard_normal((3, 2), dtype=np.float32))
    np.testing.assert_allclose(log.call(f, x, y), np.asarray(x) @ np.asarray(y) + 1.0, rtol=1e-6)
    log.call(f, x, y)                                         # cached: nothing new to log
    assert log.replay(a) == 1
    before = f._cache_size()
    other = ProgramLog()
    other.extend(log)
    assert other.replay(b) == 1 and f._cache_size() == before + 1   # compiled for b's device


def test_host_arguments_replay_as_host_arrays():
    """ids passed from the host (numpy) are replayed as numpy: a device array is another jit
    signature, and the replacement would compile again at its first real call."""
    @jax.jit
    def take(x_N, ids_M):
        return x_N[ids_M] * 3.0

    (a, b), _ = LocalRuntime().workers(2, 1)
    rng = fresh_rng()
    log = ProgramLog()
    log.call(take, a.put(rng.standard_normal(9, dtype=np.float32)), rng.integers(0, 9, 4).astype(np.int32))
    other = ProgramLog()
    other.extend(log)
    assert other.replay(b) == 1
    before = take._cache_size()
    x, ids = b.put(rng.standard_normal(9, dtype=np.float32)), rng.integers(0, 9, 4).astype(np.int32)
    np.testing.assert_allclose(take(x, ids), np.asarray(x)[ids] * 3.0, rtol=1e-6)
    assert take._cache_size() == before


def test_precompile_is_logged_even_where_the_device_compiled_it_before():
    """An earlier worker on the same device (an earlier engine in this process) compiled the
    program already: the new worker's precompile compiles nothing, and it must be logged all the
    same, or a replacement of that worker would replay nothing and compile while serving."""
    @jax.jit
    def g(x):
        return x * 2.0 + 1.0

    (a,), _ = LocalRuntime().workers(1, 1)
    x = a.put(fresh_rng().standard_normal(7, dtype=np.float32))
    ProgramLog("aw0").call(g, x)                              # the earlier worker: compiles
    quiet, logged = ProgramLog("aw0"), ProgramLog("aw0")
    quiet.call(g, x)
    with logged.recording():
        logged.call(g, x)
    assert quiet.replay(a) == 0 and logged.replay(a) == 1


def test_compile_log_counts_serving_compiles_only():
    """A worker process's CompileLog: a compile while serving is logged with its wall time, the
    program and the shapes it ran at (through a ProgramLog); one inside warming() (startup,
    precompile, a replacement's replay) is not; a cached call is none."""
    log = CompileLog()
    scale = float(fresh_rng().uniform(2, 3))
    warm = jax.jit(lambda x: x * scale)
    with log.warming():
        warm(np.ones(3, np.float32))
    assert [e for e in log.events if e.program == "<lambda>"] == []
    t0 = time.time()

    @jax.jit
    def shift(x_N, ys_MxN):
        return x_N + sum(ys_MxN) * scale
    ProgramLog("ew3").call(shift, np.ones(4, np.float32), (np.ones((2, 4), np.int32),) * 3)
    (event,) = [e for e in log.events if e.program == "shift"]    # (other tests' threads may compile too)
    assert t0 <= event.t <= time.time() and event.seconds > 0 and event.program == "shift"
    assert event.shapes == "float32[4] int32[2, 4]x3" and event.worker == "ew3"
    assert event.serving and event.thread == "MainThread"
    warm(np.ones(3, np.float32))                              # compiled already
    assert [e for e in log.events if e.program == "<lambda>"] == []
