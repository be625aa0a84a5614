"""The channels between worker processes: arrays arrive bit-exact by every path (shared memory,
inline on a Unix socket, TCP), a peer's death wakes its waiter at once, a hung peer is found at
the deadline, and calls over a worker's control channel fail as WorkerFailed naming it."""
import multiprocessing as mp
import os
import signal
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from tarragon_jax.errors import WorkerFailed
from tarragon_jax.workers import channel as chan
from tarragon_jax.workers.rpc import RpcClient, Server, gather
from seeding import fresh_rng


def _accept_one(lis: chan.Listener, tcp: bool, out: list) -> None:
    out.append(lis.accept(lis.tcp if tcp else lis.unix, {"name": "server"}))


def _pair(tcp: bool = False) -> tuple[chan.Channel, chan.Channel, chan.Listener]:
    lis = chan.Listener(name="test")
    got: list = []
    t = threading.Thread(target=_accept_one, args=(lis, tcp, got))
    t.start()
    addr = dict(lis.address, host="elsewhere") if tcp else lis.address
    client = chan.connect(addr, {"name": "client"})
    t.join()
    return client, got[0], lis


@pytest.mark.parametrize("path", ["shm", "unix_inline", "tcp"])
def test_arrays_arrive_bit_exact(path):
    a, b, lis = _pair(tcp=path == "tcp")
    rng = np.random.default_rng(int(time.time()))
    try:
        for shape, dtype in [((64, 520), np.float32), ((3, 4, 8), ml_dtypes.bfloat16), ((17,), np.int32),
                             ((1, 2048), np.float16), ((0, 8), np.float32)]:
            x = rng.standard_normal(shape).astype(dtype)
            a.send(("buf", 7, shape), x, shm=path == "shm")
            meta, y = b.recv(5.0)
            assert meta == ("buf", 7, shape) and y.dtype == x.dtype and y.shape == x.shape
            assert np.array_equal(y.view(np.uint8), x.view(np.uint8))
            b.send(("ans",), y * 2)                                    # and back
            assert np.array_equal(a.recv(5.0)[1], y * 2)
        assert (a._out is None) == (path == "tcp")                     # shared memory only on one host
        b.send({"no": "array"})
        assert a.recv(5.0) == ({"no": "array"}, None)
    finally:
        a.close(), b.close(), lis.close()


def _peer(address, stop: bool) -> None:
    ch = chan.connect(address, {"name": "peer"})
    ch.send("hello")
    time.sleep(60)


def _spawned_peer() -> tuple[mp.Process, chan.Channel, chan.Listener]:
    lis = chan.Listener(name="test")
    p = mp.get_context("spawn").Process(target=_peer, args=(lis.address, False), daemon=True)
    p.start()
    ch = lis.accept(lis.unix, {"name": "server"}, timeout=60)
    assert ch.recv(60)[0] == "hello"
    return p, ch, lis


def test_a_killed_peer_wakes_its_waiter_at_once():
    p, ch, lis = _spawned_peer()
    try:
        threading.Timer(0.3, os.kill, (p.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(chan.ChannelClosed):
            ch.recv(30.0)                                  # the deadline is far: the death ends the wait
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(chan.ChannelClosed):
            ch.send("anyone?")
    finally:
        p.kill(), ch.close(), lis.close()


def test_a_stopped_peer_is_found_at_the_deadline():
    p, ch, lis = _spawned_peer()
    try:
        os.kill(p.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(chan.ChannelTimeout):
            ch.recv(0.3)
        assert 0.29 < time.monotonic() - t0 < 2.0
        assert chan.wait_readable([ch], 0.05) == []
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.kill(), ch.close(), lis.close()


class _Target:
    def add(self, a, b):
        return a + b

    def sleep(self, s):
        time.sleep(s)
        return s

    def boom(self):
        raise ValueError("inside the worker")


def test_calls_over_a_control_channel():
    server = Server(_Target(), "ew9").start()
    fast = RpcClient("ew9", server.address, deadline_s=5.0)
    slow = RpcClient("ew8", Server(_Target(), "ew8").start().address, deadline_s=0.2)
    try:
        assert fast.call("add", 2, 3) == 5
        fast.cast("add", 1, 1)                              # no answer awaited, still in order
        assert fast.call("add", np.arange(3), 1).tolist() == [1, 2, 3]
        with pytest.raises(Exception, match="inside the worker"):
            fast.call("boom")
        t0 = time.monotonic()
        with pytest.raises(WorkerFailed, match="ew8.*deadline"):
            slow.call("sleep", 5.0)
        assert time.monotonic() - t0 < 2
        got = gather({"a": (fast, fast.submit("sleep", 0.05)), "b": (fast, fast.submit("add", 1, 2))}, 5.0)
        assert got == {"a": 0.05, "b": 3}
    finally:
        fast.close(), slow.close()


class _Compiler:
    """A worker that meets a new shape: its call compiles for much longer than the deadline."""

    def compile(self, n: int) -> float:
        import jax
        import jax.numpy as jnp

        def many(x):
            for k in range(n):
                x = jnp.tanh(x * (k + 1.5)) + jnp.cumsum(x) * 0.5
            return x.sum()
        size = int(fresh_rng().integers(1000, 100000))    # a shape no compile cache holds
        return float(jnp.tanh(jax.jit(many)(jnp.arange(size, dtype=jnp.float32))))

    def sleep(self, s):
        time.sleep(s)


def test_a_compiling_worker_is_waited_for_and_a_silent_one_is_not():
    """keepalive.py: while the serving thread compiles, its waiter hears that it is alive every
    eighth of its deadline and waits on; a call that merely takes long fails at the deadline."""
    from tarragon_jax.workers.keepalive import Keepalive
    server = Server(_Compiler(), "ew7")
    keepalive = Keepalive(server.waiting, 0.025, 0.2, serving=server.thread)
    server.start()
    client = RpcClient("ew7", server.address, deadline_s=0.2)
    try:
        t0 = time.monotonic()
        assert np.isfinite(client.call("compile", 40))
        assert time.monotonic() - t0 > 0.3 and keepalive.sent >= 3     # past the deadline, vouched for
        got = gather({"c": (client, client.submit("compile", 40))}, 0.2)
        assert np.isfinite(got["c"])
        with pytest.raises(WorkerFailed, match="deadline"):
            client.call("sleep", 1.0)
    finally:
        keepalive.close(), client.close(), server.stop()
