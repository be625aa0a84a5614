"""jax.experimental.transfer between two processes, on this machine's devices: what a pull costs,
and what a peer's death does to the survivor (issue 11: is it safe to move EW rows device to
device instead of through Ray?). `python -m launch.transfer_trial --json_out results/transfer_trial.json`.

Three checks, each with two fresh processes (this script in a serving and a pulling role):
  latency     the puller fetches a [rows, cols] f32 array `--pulls` times; median and min ms
  server_dies the server is SIGKILLed while the puller waits on a pull (with a deadline): does
              the puller raise, hang until the deadline, or abort? (Without a deadline, a pull from
              a server that died first hangs: seen while writing this script.)
  puller_dies the puller is SIGKILLed 5 ms into a 64 MB pull: does the server keep running?
"""
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 64, "Rows of the pulled array (the latency check).")
flags.DEFINE_integer("cols", 128, "Columns of the pulled array.")
flags.DEFINE_integer("pulls", 200, "Pulls timed in the latency check.")
flags.DEFINE_float("pull_deadline_s", 10.0, "server_dies: the pending pull's deadline.")
flags.DEFINE_string("role", None, "Internal: server | puller.")
flags.DEFINE_string("check", "latency", "Internal: which check this process plays.")
flags.DEFINE_string("address", None, "Internal: the server's address.")
flags.DEFINE_string("flag_file", None, "Internal: the puller creates it when the server may die.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")


def _server():
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import transfer
    import jax
    srv = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
    print(srv.address(), flush=True)
    rows, cols = (4096, 4096) if FLAGS.check == "puller_dies" else (FLAGS.rows, FLAGS.cols)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, cols), np.float32))
    for uuid in range(FLAGS.pulls + 1):
        srv.await_pull(uuid, [x])
    if FLAGS.check == "server_dies":
        while not os.path.exists(FLAGS.flag_file):
            time.sleep(0.01)
        os.kill(os.getpid(), 9)
    t0 = time.time()
    while time.time() - t0 < 10:                   # keep working: does a dead peer take this process?
        (x[:64, :64] @ x[:64, :64]).block_until_ready()
        time.sleep(0.05)
    print(json.dumps({"server_alive": True}), flush=True)


def _puller():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import transfer
    srv = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
    conn = srv.connect(FLAGS.address)
    rows, cols = (4096, 4096) if FLAGS.check == "puller_dies" else (FLAGS.rows, FLAGS.cols)
    spec = [jax.ShapeDtypeStruct((rows, cols), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))]
    if FLAGS.check == "latency":
        times = []
        for uuid in range(FLAGS.pulls):
            t0 = time.perf_counter()
            jax.block_until_ready(conn.pull(uuid, spec))
            times.append(time.perf_counter() - t0)
        print(json.dumps({"median_ms": float(np.median(times)) * 1e3, "min_ms": min(times) * 1e3}), flush=True)
    elif FLAGS.check == "server_dies":
        open(FLAGS.flag_file, "w").close()
        t0 = time.perf_counter()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=FLAGS.pull_deadline_s)
        try:
            jax.block_until_ready(conn.pull(10**6, spec, timeout=deadline))   # never offered
            out = {"outcome": "returned"}
        except Exception as e:  # noqa: BLE001 -- what it raises is the finding
            out = {"outcome": "raised", "error": f"{type(e).__name__}: {str(e)[:160]}"}
        print(json.dumps(dict(out, after_s=time.perf_counter() - t0)), flush=True)
    else:
        jax.block_until_ready(conn.pull(0, spec))
        threading.Timer(0.005, lambda: os.kill(os.getpid(), 9)).start()
        conn.pull(1, spec)
        time.sleep(5)


def _run(check: str) -> dict:
    """Start a server and a puller for `check`; their last JSON lines, exit codes and stderr tails."""
    base = [sys.executable, "-m", f"{__package__}.transfer_trial", f"--check={check}", f"--rows={FLAGS.rows}",
            f"--cols={FLAGS.cols}", f"--pulls={FLAGS.pulls}", f"--pull_deadline_s={FLAGS.pull_deadline_s}"]
    flag_file = os.path.join(tempfile.mkdtemp(), "go")
    server = subprocess.Popen(base + ["--role=server", f"--flag_file={flag_file}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    address = server.stdout.readline().strip()
    puller = subprocess.run(base + ["--role=puller", f"--address={address}", f"--flag_file={flag_file}"],
                            capture_output=True, text=True, timeout=120)
    s_out, s_err = server.communicate(timeout=120)

    def last_json(text):
        lines = [l for l in text.splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    return {"check": check, "puller": last_json(puller.stdout), "puller_rc": puller.returncode,
            "server": last_json(s_out), "server_rc": server.returncode,
            "stderr_tail": (puller.stderr + s_err).strip().splitlines()[-3:]}


def main(argv):
    del argv
    if FLAGS.role == "server":
        return _server()
    if FLAGS.role == "puller":
        return _puller()
    import jax
    rows = [_run(c) for c in ("latency", "server_dies", "puller_dies")]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    lat, dies, pdies = rows
    print(f"latency: a [{FLAGS.rows}, {FLAGS.cols}] f32 pull, median {lat['puller'].get('median_ms', float('nan')):.3f} "
          f"ms (min {lat['puller'].get('min_ms', float('nan')):.3f}) over {FLAGS.pulls}")
    print(f"server_dies: the waiting puller {dies['puller'].get('outcome', 'aborted')} after "
          f"{dies['puller'].get('after_s', float('nan')):.2f} s (exit code {dies['puller_rc']}): "
          f"{dies['puller'].get('error', '')}")
    print(f"puller_dies: the server {'kept running' if pdies['server'].get('server_alive') else 'died'} "
          f"(exit code {pdies['server_rc']})")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"jax": jax.__version__, "platform": jax.devices()[0].platform, "checks": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
