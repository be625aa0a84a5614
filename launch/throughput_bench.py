"""Failure-free serving throughput and latency by batch size: `python -m launch.throughput_bench --model tiny`.

For each batch size B, B random prompts are submitted at once and decoded to --output_len
tokens on one engine (built once; every batch size gets an untimed pass first, so compiles are
not timed). Reports output tokens/s (median and range over --repeats), time to first token and
inter-token latency percentiles, the EW load max/mean (rows per EW over the pass: over all
layers, and in the worst layer), and writes JSON. All serving flags apply (--runtime,
--expert_backend, --attention_backend, --precompile, --checkpoint, ...). `--runtimes local,ray`
measures several runtimes in one run, their passes alternated, and prints each one's throughput
as a ratio of the first's (the median ratio of paired passes); under ray it also times an idle
actor's round trip (the floor of one cross-process hop on this machine). `--compare_prefix_caching`
measures an engine with prefix caching and one without the same way (the prompts share no prefix:
what caching costs), `--compare_eplb` one with every replica serving and one without,
`--compare_logprobs` one engine's passes with every request asking for `--logprobs` (default 5)
alternatives and without (what logprobs cost), `--compare_grammar` one engine's passes with every
request following a JSON schema's grammar (an array of objects too long to end within
--output_len, so both variants decode as many tokens) and without (what structured outputs
cost). Every pass
starts with an empty prefix cache, so a repeated prompt is computed again. launch/compare_runs.py
averages such ratios over runs.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import gc
import json
import statistics
import sys
import time

from absl import app, flags

from . import serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "4", "16", "64"], "Concurrent requests per measurement.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 64, "New tokens per request.")
flags.DEFINE_integer("repeats", 3, "Timed passes per batch size.")
flags.DEFINE_integer("seed", 0, "Prompt seed.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
flags.DEFINE_list("runtimes", None, "Measure these runtimes in one run, passes alternated (e.g. local,ray); "
                  "default: --runtime alone.")
flags.DEFINE_bool("compare_prefix_caching", False, "Measure --runtime with prefix caching and without in one run, "
                  "passes alternated.")
flags.DEFINE_bool("compare_eplb", False, "Measure --runtime with --eplb and --noeplb in one run, passes alternated "
                  "(peer_bench: also run our engine with --eplb flipped).")
flags.DEFINE_integer("logprobs", None, "Every request asks for its tokens' logprobs with this many alternatives "
                     "(default: none).")
flags.DEFINE_bool("compare_logprobs", False, "Measure one engine's passes with every request asking for logprobs "
                  "(--logprobs, default 5) and without, alternated.")
flags.DEFINE_bool("compare_grammar", False, "Measure one engine's passes with every request following a JSON "
                  "schema's grammar (structured outputs) and without, alternated.")
# objects of a JSON array no pass can end: every structured request decodes --output_len tokens
ENDLESS_JSON = {"type": "array", "minItems": 1_000_000, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "size": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["name", "size"], "additionalProperties": False}}
flags.DEFINE_bool("reverse_variants", False, "Build the compared variants (--runtimes, --compare_*) in the "
                  "opposite order: here the engine built first ran 1-2% slower, so a comparison averages runs of both orders.")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def ew_rows(engine, reader) -> dict:
    """Rows per (layer, slot) each live EW served since the reader's last read (waits for them)."""
    ctl = engine.controller
    return {ew.handle.name: reader.read(ew.handle.name, ew) for ew in ctl.ews if not ctl.health.is_failed(ew.handle.name)}


def measure(engine, prompts, sampling) -> dict:
    """One pass: every prompt submitted at t=0; throughput, TTFT and inter-token gaps, and the EW
    load max/mean over the pass (its rows per EW, read before and after the timed part)."""
    from tarragon_jax.control import expert_load
    reader = expert_load.SlotRowReader()
    ew_rows(engine, reader)
    engine.reset_prefix_cache()                  # the same prompts every pass: each computes them
    t0, cpu0 = time.perf_counter(), time.process_time()
    ids = [engine.submit(p, sampling) for p in prompts]
    for _ in engine.stream():
        pass
    secs, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    times = [engine.metrics.requests[i] for i in ids]
    gaps = [g for t in times for g in t.gaps_s]
    load = expert_load.summary(ew_rows(engine, reader))
    n = sum(len(engine.requests[i].output) for i in ids)
    return {"tok_s": n / secs, "tok_per_cpu_s": n / cpu,
            "ttft_p50_s": percentile([t.ttft_s for t in times], 50),
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "ew_load": load["ew_load"], "ew_load_worst_layer": load["ew_load_worst_layer"]}


def full_collection_s() -> float:
    """Seconds a full collection of this process's heap takes (every Python thread waits)."""
    gc.collect()                                 # what is garbage now: the timed one walks live objects
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0


def paired_ratios(base: list[dict], runs: list[dict]) -> dict:
    """`runs` over `base`, pass by pass: the two variants' passes of a repeat ran one after the
    other, so the median of their ratios cancels the machine's drift over the run (on a shared
    host a pass's throughput wandered 2x within minutes), which the ratio of medians does not."""
    return {"ratio": statistics.median(r["tok_s"] / b["tok_s"] for b, r in zip(base, runs)),
            "cpu_ratio": statistics.median(r["tok_per_cpu_s"] / b["tok_per_cpu_s"] for b, r in zip(base, runs))}


def ray_round_trip_s(n: int = 30) -> float:
    """Median round trip of a call to an idle Ray actor that returns a small array."""
    import numpy as np
    import ray

    class Echo:
        def f(self):
            return np.zeros(64, np.float32)
    actor = ray.remote(num_cpus=0)(Echo).remote()
    ray.get(actor.f.remote())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(actor.f.remote())
        times.append(time.perf_counter() - t0)
    ray.kill(actor)
    return statistics.median(times)


def main(argv):
    del argv
    cfg, params, ckpt, reload, _ = serving_flags.start()
    import numpy as np
    from tarragon_jax.config import SamplingParams
    from tarragon_jax.heap import freeze_startup_heap
    from tarragon_jax.serving.engine import Engine
    from tarragon_jax.errors import RequestError
    from tarragon_jax.workers.grammar import json_grammar
    runtimes = FLAGS.runtimes or [FLAGS.runtime]
    if len(set(runtimes)) != len(runtimes) or not set(runtimes) <= {"local", "ray"}:
        sys.exit(f"error: --runtimes must name distinct runtimes out of local, ray; got {runtimes}")
    variants = {rt: dict(runtime=rt) for rt in runtimes}
    compared = [name for name in ("prefix_caching", "eplb", "logprobs", "grammar") if FLAGS[f"compare_{name}"].value]
    if len(compared) + (len(runtimes) > 1) > 1:
        sys.exit("error: compare one thing per run: --runtimes, --compare_prefix_caching, --compare_eplb, "
                 "--compare_logprobs or --compare_grammar")
    if compared in (["logprobs"], ["grammar"]):  # one engine; the requests differ
        variants = {compared[0]: {}, f"no_{compared[0]}": {}}
    elif compared:
        variants = {name: {compared[0]: on} for name, on in ((compared[0], True), (f"no_{compared[0]}", False))}
    if FLAGS.reverse_variants:
        variants = dict(reversed(variants.items()))
    runtimes = list(variants)                    # the measured variants, by name
    vocab = None                                 # what grammars follow: only where they are measured
    if compared == ["grammar"]:
        tokenizer = serving_flags.tokenizer(ckpt, cfg)
        vocab = serving_flags.vocabulary(tokenizer, serving_flags.eos_ids(ckpt, tokenizer), cfg)
        if vocab is None:
            sys.exit("error: --compare_grammar needs a tokenizer (the checkpoint's tokenizer.json)")
    built: dict = {}                             # variants of the same engine config share its engine
    engines = {}
    for rt, kw in variants.items():
        key = tuple(sorted(kw.items()))
        if key not in built:
            built[key] = Engine(cfg, params, serving_flags.engine_config(**kw), serving_flags.cache_config(),
                                load_params=reload, vocab=vocab)
        engines[rt] = built[key]
    heap = {"full_collection_s": full_collection_s(), "frozen": freeze_startup_heap(),
            "full_collection_frozen_s": full_collection_s()}    # as launch/serve.py does once warm
    memory = {rt: {name: p.get("rss_mb") for name, p in e.controller.processes().items()} for rt, e in engines.items()}
    hop = ray_round_trip_s() if "ray" in runtimes else None
    asks = FLAGS.logprobs if FLAGS.logprobs is not None else (5 if compared == ["logprobs"] else None)
    grammar = json_grammar(ENDLESS_JSON) if compared == ["grammar"] else None
    sampling = {rt: SamplingParams(max_new_tokens=FLAGS.output_len, logprobs=None if rt == "no_logprobs" else asks,
                                   grammar=None if rt == "no_grammar" else grammar)
                for rt in runtimes}
    rng = np.random.default_rng(FLAGS.seed)
    rows = {rt: [] for rt in runtimes}
    try:
        for batch in map(int, FLAGS.batch_sizes):
            prompts = [rng.integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist() for _ in range(batch)]
            for rt, engine in engines.items():
                measure(engine, prompts, sampling[rt])                          # untimed: compiles
            runs = {rt: [] for rt in runtimes}
            for rep in range(FLAGS.repeats):
                for rt in (runtimes if rep % 2 == 0 else runtimes[::-1]):
                    runs[rt].append(measure(engines[rt], prompts, sampling[rt]))
            for rt in runtimes:
                tok_s = [r["tok_s"] for r in runs[rt]]
                rows[rt].append({"batch": batch, "tok_s": statistics.median(tok_s), "tok_s_min": min(tok_s),
                                 "tok_s_max": max(tok_s),
                                 **{k: statistics.median(r[k] for r in runs[rt])
                                    for k in ("tok_per_cpu_s", "ttft_p50_s", "itl_p50_s", "itl_p99_s", "ew_load",
                                              "ew_load_worst_layer")},
                                 "runs": runs[rt],
                                 **paired_ratios(runs[runtimes[0]], runs[rt])})
    except RequestError as e:
        sys.exit(f"error: {e}")
    finally:
        for engine in built.values():
            engine.close()
    for rt in runtimes:
        label = f"runtime {rt}" if rt in ("local", "ray") else f"runtime {FLAGS.runtime}, {rt}"
        print(f"{cfg.family}, {FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs, {label}, "
              f"experts {FLAGS.expert_backend}, attention {FLAGS.attention_backend}, prompt {FLAGS.prompt_len}, output {FLAGS.output_len}, median of {FLAGS.repeats}")
        print(f"{'batch':>5} {'tok/s':>8} {'(min-max)':>15} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'ITL p99 ms':>11} "
              f"{'EW load max/mean':>17} {'worst layer':>11}")
        for r in rows[rt]:
            print(f"{r['batch']:5d} {r['tok_s']:8.1f} {r['tok_s_min']:7.1f}-{r['tok_s_max']:<7.1f} "
                  f"{1e3 * r['ttft_p50_s']:12.1f} {1e3 * r['itl_p50_s']:11.1f} {1e3 * r['itl_p99_s']:11.1f} "
                  f"{r['ew_load']:17.2f} {r['ew_load_worst_layer']:11.2f}")
    for rt in runtimes[1:]:                      # each pass over the other variant's beside it in time
        print(f"{rt} / {runtimes[0]} throughput, median of the {FLAGS.repeats} paired passes: " + ", ".join(
            f"B={r['batch']} {r['ratio']:.3f}" for r in rows[rt]))
        print(f"{rt} / {runtimes[0]} tokens per CPU second of this process, paired: " + ", ".join(
            f"B={r['batch']} {r['cpu_ratio']:.3f}" for r in rows[rt]))
    for rt in runtimes:
        print(f"{rt}: resident MB after startup: " + ", ".join(f"{k} {v:.0f}" for k, v in memory[rt].items() if v))
    print(f"a full collection of this process's heap: {heap['full_collection_s'] * 1e3:.0f} ms, "
          f"{heap['full_collection_frozen_s'] * 1e3:.1f} ms once start-up's {heap['frozen']} objects are frozen")
    if hop is not None:
        print(f"ray: an idle actor's round trip {hop * 1e3:.2f} ms (median of 30)")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"config": {k: FLAGS[k].value for k in ("runtime", "runtimes", "expert_backend",
                                                               "attention_backend", "prompt_len", "output_len",
                                                               "repeats", "eplb", "compare_prefix_caching", "compare_eplb",
                                                               "compare_logprobs", "compare_grammar", "logprobs",
                                                               "reverse_variants", "seed")},
                       "rows": rows[runtimes[0]], "by_runtime": rows, "ray_round_trip_s": hop,
                       "resident_mb": memory, "heap": heap}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
