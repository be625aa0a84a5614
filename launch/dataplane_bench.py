"""Round trip of one layer's buffer between two worker processes, by data plane.

An "AW" process sends a [T, D + 2k] buffer, an "EW" process echoes it, the AW receives it: what
one MoE layer's exchange costs above the compute. Planes: the project's channel (workers/channel.py)
over a Unix socket with shared memory (what worker processes on one host use), the same channel
with the array on the Unix socket, over TCP (what hosts use), pyzmq PAIR over ipc:// (if
installed), and a Ray actor call (the old data path). Prints a table, writes JSON.

  python -m launch.dataplane_bench --rows 64 --cols 520 --iters 2000 --spin_us 0,100
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("rows", 64, "token rows of the buffer")
flags.DEFINE_integer("cols", 520, "columns: d_model + packed routing (the 93M checkpoint: 512 + 2*4)")
flags.DEFINE_integer("iters", 2000, "round trips per plane (after 200 warm-up ones)")
flags.DEFINE_list("spin_us", ["0", "100"], "channel planes: how long each side polls before sleeping (one row each)")
flags.DEFINE_list("planes", ["channel_shm", "channel_unix", "channel_tcp", "zmq_ipc", "ray"], "planes to measure")
flags.DEFINE_integer("death_trials", 20, "times a waiting receiver's peer is SIGKILLed (wake-up latency)")
flags.DEFINE_string("json_out", "results/dataplane_bench.json", "where to write the results")
FLAGS = flags.FLAGS


def _echo_channel(q, shm: bool, tcp: bool, spin_s: float) -> None:
    from tarragon_jax.workers import channel
    lis = channel.Listener(name="bench")
    addr = dict(lis.address)
    if tcp:
        addr["host"] = "elsewhere"         # forces the TCP path
    q.put(addr)
    import selectors
    sel = selectors.DefaultSelector()
    for s in lis.sockets():
        sel.register(s, selectors.EVENT_READ)
    s = sel.select()[0][0].fileobj
    ch = lis.accept(s, {"name": "ew"})
    while True:
        try:
            meta, a = ch.recv(None, spin_s)
        except channel.ChannelClosed:
            return
        ch.send(meta, a, shm=shm)


def _echo_zmq(q) -> None:
    import zmq
    sock = zmq.Context().socket(zmq.PAIR)
    path = f"ipc:///tmp/tarragon-bench-{os.getpid()}"
    sock.bind(path)
    q.put(path)
    while True:
        msg = sock.recv_multipart(copy=False)
        if len(msg) == 1:
            return
        sock.send_multipart(msg, copy=False)


def _times(fn, iters: int) -> np.ndarray:
    for _ in range(200):
        fn()
    out = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out * 1e6


def measure(plane: str, buf: np.ndarray, iters: int, spin_s: float = 0.0) -> np.ndarray | None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    if plane.startswith("channel"):
        from tarragon_jax.workers import channel
        p = ctx.Process(target=_echo_channel, args=(q, plane == "channel_shm", plane == "channel_tcp", spin_s),
                        daemon=True)
        p.start()
        ch = channel.connect(q.get(timeout=60), {"name": "aw"})
        shm = plane == "channel_shm"

        def once():
            ch.send(("step", 0), buf, shm=shm)
            _, y = ch.recv(5.0, spin_s)
            return y
        assert np.array_equal(once(), buf)
        t = _times(once, iters)
        ch.close()
    elif plane == "zmq_ipc":
        try:
            import zmq
        except ImportError:
            return None
        p = ctx.Process(target=_echo_zmq, args=(q,), daemon=True)
        p.start()
        sock = zmq.Context().socket(zmq.PAIR)
        sock.connect(q.get(timeout=60))

        def once():
            sock.send_multipart([b"step", buf], copy=False)
            _, y = sock.recv_multipart(copy=False)
            return np.frombuffer(y.buffer, buf.dtype).reshape(buf.shape).copy()
        assert np.array_equal(once(), buf)
        t = _times(once, iters)
        sock.send_multipart([b"x"])
    elif plane == "ray":
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

        @ray.remote(num_cpus=0)
        class Echo:
            def echo(self, a):
                return a
        e = Echo.remote()
        t = _times(lambda: ray.get(e.echo.remote(buf)), min(iters, 500))
        ray.shutdown()
        return t
    else:
        raise ValueError(f"unknown plane {plane!r}")
    p.join(timeout=5)
    if p.is_alive():
        p.kill()
    return t


def death_wake_ms(trials: int) -> np.ndarray:
    """A receiver waits on an idle peer with a 30 s deadline; the peer is SIGKILLed: how long
    until the receiver knows (what an AW waiting on a dead EW's answer sees)."""
    import signal
    import threading
    from tarragon_jax.workers import channel
    ctx, out = mp.get_context("spawn"), []
    for _ in range(trials):
        q = ctx.Queue()
        p = ctx.Process(target=_echo_channel, args=(q, True, False, 0.0), daemon=True)
        p.start()
        ch = channel.connect(q.get(timeout=60), {"name": "aw"})
        woke = []

        def wait():
            try:
                ch.recv(30.0)
            except channel.ChannelClosed:
                woke.append(time.perf_counter())
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.1)
        t0 = time.perf_counter()
        os.kill(p.pid, signal.SIGKILL)
        t.join()
        out.append((woke[0] - t0) * 1e3)
        ch.close()
        p.join()
    return np.array(out)


def main(argv) -> None:
    del argv
    buf = np.random.default_rng(0).standard_normal((FLAGS.rows, FLAGS.cols)).astype(np.float32)
    rows = []
    print(f"round trip of a [{FLAGS.rows}, {FLAGS.cols}] f32 buffer ({buf.nbytes / 1024:.0f} KiB), two processes, us")
    print(f"{'plane':<14}{'spin us':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
    runs = [(p, float(sp)) for p in FLAGS.planes for sp in (FLAGS.spin_us if p.startswith("channel") else ["0"])]
    for plane, spin_us in runs:
        t = measure(plane, buf, FLAGS.iters, spin_us * 1e-6)
        if t is None:
            print(f"{plane:<14} (not installed)")
            continue
        row = {"plane": plane, "spin_us": spin_us, "p50_us": float(np.percentile(t, 50)), "p90_us": float(np.percentile(t, 90)),
               "p99_us": float(np.percentile(t, 99)), "mean_us": float(t.mean()), "n": len(t)}
        rows.append(row)
        print(f"{plane:<14}{spin_us:>8.0f}{row['p50_us']:>9.1f}{row['p90_us']:>9.1f}{row['p99_us']:>9.1f}{row['mean_us']:>9.1f}")
    death = death_wake_ms(FLAGS.death_trials) if FLAGS.death_trials else np.array([np.nan])
    print(f"a SIGKILLed peer wakes its waiting receiver in {np.median(death):.2f} ms (median), "
          f"{death.max():.2f} ms (max of {len(death)})")
    out = {"rows": FLAGS.rows, "cols": FLAGS.cols, "bytes": buf.nbytes, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "planes": rows,
           "death_wake_ms": {"median": float(np.median(death)), "max": float(death.max()), "n": len(death)}}
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
        json.dump(out, f, indent=1)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
