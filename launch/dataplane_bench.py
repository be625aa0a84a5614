"""Round trip of one layer's buffer between two worker processes, by data plane.

An "AW" process sends a [T, D + 2k] buffer, an "EW" process echoes it, the AW receives it: what
one MoE layer's exchange costs above the compute. Planes: the project's channel (workers/channel.py)
over a Unix socket with shared memory (what worker processes on one host use), the same channel
with the array on the Unix socket, over TCP (what hosts use), pyzmq PAIR over ipc:// (if
installed), and a Ray actor call (the old data path). Prints a table, writes JSON.

  python -m launch.dataplane_bench --rows 64 --cols 520 --iters 2000
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
flags.DEFINE_list("planes", ["channel_shm", "channel_unix", "channel_tcp", "zmq_ipc", "ray"], "planes to measure")
flags.DEFINE_string("json_out", "results/dataplane_bench.json", "where to write the results")
FLAGS = flags.FLAGS


def _echo_channel(q, shm: bool, tcp: bool) -> None:
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
            meta, a = ch.recv(None)
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


def measure(plane: str, buf: np.ndarray, iters: int) -> np.ndarray | None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    if plane.startswith("channel"):
        from tarragon_jax.workers import channel
        p = ctx.Process(target=_echo_channel, args=(q, plane == "channel_shm", plane == "channel_tcp"), daemon=True)
        p.start()
        ch = channel.connect(q.get(timeout=60), {"name": "aw"})
        shm = plane == "channel_shm"

        def once():
            ch.send(("step", 0), buf, shm=shm)
            _, y = ch.recv(5.0)
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


def main(argv) -> None:
    del argv
    buf = np.random.default_rng(0).standard_normal((FLAGS.rows, FLAGS.cols)).astype(np.float32)
    rows = []
    print(f"round trip of a [{FLAGS.rows}, {FLAGS.cols}] f32 buffer ({buf.nbytes / 1024:.0f} KiB), two processes, us")
    print(f"{'plane':<14}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
    for plane in FLAGS.planes:
        t = measure(plane, buf, FLAGS.iters)
        if t is None:
            print(f"{plane:<14} (not installed)")
            continue
        row = {"plane": plane, "p50_us": float(np.percentile(t, 50)), "p90_us": float(np.percentile(t, 90)),
               "p99_us": float(np.percentile(t, 99)), "mean_us": float(t.mean()), "n": len(t)}
        rows.append(row)
        print(f"{plane:<14}{row['p50_us']:>9.1f}{row['p90_us']:>9.1f}{row['p99_us']:>9.1f}{row['mean_us']:>9.1f}")
    out = {"rows": FLAGS.rows, "cols": FLAGS.cols, "bytes": buf.nbytes, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "planes": rows}
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
        json.dump(out, f, indent=1)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
