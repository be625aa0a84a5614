"""Which expert backend an EW should use on this machine: `python -m launch.expert_backend_bench`.

Times the expert worker's whole layer program (model/expert_stage.expert_layer: unpack, sort by
slot, grouped SwiGLU FFN, unsort) per backend, at one EW of the peer benchmark's model by default
(launch/peer_bench.py: d_model 512, expert FFN 256, 16 experts top-4 over 4 EWs, so 4 primaries
and 4 idle shadow slots), for 2 AWs sending T tokens each with routing drawn uniformly. Every
backend's output is checked against the first one's. Prints median ms per call and the ratio to
ragged_dot, writes JSON. `--expert_backend auto` on CPU is the winner here ("tiles").
"""
import json
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("backends", ["tiles", "ragged_dot", "dense"], "Backends to time.")
flags.DEFINE_list("tokens", ["1", "8", "32", "128"], "Tokens per AW (T); each has top_k pairs.")
flags.DEFINE_integer("num_aws", 2, "AWs sending to the EW.")
flags.DEFINE_integer("num_ews", 4, "EWs sharing the experts (routing spreads pairs over them).")
flags.DEFINE_integer("d_model", 512, "Hidden size.")
flags.DEFINE_integer("d_expert", 256, "Expert FFN size.")
flags.DEFINE_integer("n_experts", 16, "Experts per layer.")
flags.DEFINE_integer("top_k", 4, "Experts per token.")
flags.DEFINE_integer("shadow_slots", 4, "Idle shadow slots on the EW.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
flags.DEFINE_integer("repeats", 30, "Timed calls (median).")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tarragon_jax.model import wire
    from tarragon_jax.model.expert_stage import expert_layer
    rng = np.random.default_rng(0)
    dt, D, F, k = jnp.dtype(FLAGS.dtype), FLAGS.d_model, FLAGS.d_expert, FLAGS.top_k
    primaries = FLAGS.n_experts // FLAGS.num_ews
    S = primaries + FLAGS.shadow_slots
    w = {name: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[1]), dt)
         for name, shape in (("w_gate", (S, D, F)), ("w_up", (S, D, F)), ("w_down", (S, F, D)))}
    rows = []
    for T in map(int, FLAGS.tokens):
        bufs = []
        for _ in range(FLAGS.num_aws):
            experts = np.stack([rng.choice(FLAGS.n_experts, k, replace=False) for _ in range(T)])
            route = np.concatenate([experts % FLAGS.num_ews, experts // FLAGS.num_ews], axis=1).astype(np.int32)
            bufs.append(wire.pack(jnp.asarray(rng.standard_normal((T, D)), dt), jnp.asarray(route)))
        bufs = tuple(bufs)
        row, first = {"tokens_per_aw": T, "pairs_on_this_ew": int(sum(
            (np.asarray(wire.unpack(b, D)[1][:, :k]) == 0).sum() for b in bufs))}, None
        for backend in FLAGS.backends:
            # as an EW holds them: "tiles" keeps one array per slot (expert_worker._stack)
            wb = {n: tuple(a[i] for i in range(S)) for n, a in w.items()} if backend == "tiles" else w
            call = lambda: expert_layer(wb, jnp.int32(0), jnp.int32(0), bufs, top_k=k, backend=backend)
            out = np.concatenate([np.asarray(y, np.float32).reshape(-1) for y in call()])
            if first is None:
                first = out
            assert np.allclose(out, first, rtol=2e-2, atol=2e-2 * np.abs(first).max()), backend
            times = []
            for _ in range(FLAGS.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - t0)
            row[backend] = statistics.median(times)
        rows.append(row)
    print(f"one EW: {primaries} primaries + {FLAGS.shadow_slots} shadow slots, d_model {D}, expert FFN {F}, "
          f"top-{k}, {FLAGS.num_aws} AWs, {FLAGS.dtype}; median ms of {FLAGS.repeats} calls")
    print(f"{'T/AW':>5} {'pairs':>6} " + " ".join(f"{b:>12}" for b in FLAGS.backends)
          + ("  vs ragged_dot" if "ragged_dot" in FLAGS.backends else ""))
    for r in rows:
        line = f"{r['tokens_per_aw']:5d} {r['pairs_on_this_ew']:6d} " + " ".join(
            f"{1e3 * r[b]:12.3f}" for b in FLAGS.backends)
        if "ragged_dot" in FLAGS.backends:
            line += "  " + ", ".join(f"{b} {r['ragged_dot'] / r[b]:.1f}x" for b in FLAGS.backends if b != "ragged_dot")
        print(line)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"config": {f: FLAGS[f].value for f in ("num_aws", "num_ews", "d_model", "d_expert",
                                                             "n_experts", "top_k", "shadow_slots", "dtype")},
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
