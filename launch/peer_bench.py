"""Our engine against a real peer, in one run: transformers' `generate` (PyTorch, eager, this
CPU) and tarragon_jax on the same Hugging Face checkpoint, the same prompts and batch sizes.

  python -m launch.peer_bench --json_out results/peer_qwen3_cpu.json

Without --checkpoint it writes (once, cached) a Qwen3-MoE checkpoint of the class the project is
measured on: hidden 512, 12 layers, 16 experts top-4, random weights, about 92M parameters. Every
batch size gets an untimed pass on each side first (compiles, caches); then --repeats timed passes,
and the table shows the median tokens/s (min-max) and the ratio to transformers, for our engine
with resilience on (shadows, KV snapshots, heartbeats) and off. Greedy tokens of the two systems
are compared too (f32; they may part where two logits are within rounding of each other), and so
are the top-5 logprobs of every greedy token of the smallest batch against transformers'
log-softmax of the same step.
torch and transformers are optional (requirements-dev.txt); neither the main job nor the tests
need them.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import functools
import json
import os
import statistics
import sys
import time

from absl import app, flags

from . import serving_flags
from .throughput_bench import measure    # and its flags: --batch_sizes, --prompt_len, --output_len,
                                               # --repeats, --seed, --json_out, --compare_eplb

FLAGS = flags.FLAGS
flags.DEFINE_string("peer_checkpoint_dir", os.path.join(os.path.expanduser("~"), ".cache", "tarragon_jax",
                                                        "peer_qwen3_moe_92m"),
                    "Where the default checkpoint is written (when no --checkpoint is given).")
flags.DEFINE_bool("compare_resilience_off", True, "Also run our engine with --noresilience.")
flags.DEFINE_bool("compare_pingpong", False, "Also run our engine with --pingpong flipped (resilience on).")
FLAGS.set_default("batch_sizes", ["1", "16", "64"])

PEER_CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                   num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                   num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                   mlp_only_layers=[], max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
                   tie_word_embeddings=False, use_sliding_window=False, bos_token_id=None, eos_token_id=None,
                   pad_token_id=None)


def _torch():
    try:
        import torch
        import transformers
    except ImportError:
        sys.exit("error: peer_bench needs torch and transformers: pip install -r requirements-dev.txt")
    return torch, transformers


def write_checkpoint(path: str) -> str:
    """The default peer checkpoint (Qwen3-MoE, random weights, seed 0), written by transformers."""
    torch, transformers = _torch()
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**PEER_CONFIG)).to(torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path + ".tmp", safe_serialization=True)
    os.replace(path + ".tmp", path)
    return path


def run_transformers(path: str, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """(tok/s, greedy tokens) of one `generate` over the batch (equal prompt lengths: no padding)."""
    torch, _ = _torch()
    model = _hf_model(path)
    x = torch.tensor(prompts)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=FLAGS.output_len, min_new_tokens=FLAGS.output_len,
                             eos_token_id=None, pad_token_id=0)
        secs = time.perf_counter() - t0
    new = out[:, x.shape[1]:].tolist()
    return sum(map(len, new)) / secs, new


@functools.cache
def _hf_model(path: str):
    torch, transformers = _torch()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_engine(engine, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """(tok/s, greedy tokens) of one pass of our engine over the batch (all submitted at once)."""
    from tarragon_jax.config import SamplingParams
    sampling = SamplingParams(max_new_tokens=FLAGS.output_len)
    before = set(engine.requests)
    tok_s = measure(engine, prompts, sampling)["tok_s"]
    ids = [i for i in engine.requests if i not in before]
    out = [list(engine.requests[i].output) for i in ids]
    for i in ids:
        engine.forget(i)
    return tok_s, out


def logprob_check(engine, path: str, prompts: list[list[int]], k: int = 5) -> dict:
    """Our top-k logprobs of every greedy token against transformers' log-softmax of the same
    step, compared at our top-k ids (a near-tie may order them differently), while both runs
    still follow the same tokens."""
    import numpy as np
    from tarragon_jax.config import SamplingParams
    torch, _ = _torch()
    x = torch.tensor(prompts)
    with torch.inference_mode():
        out = _hf_model(path).generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                       max_new_tokens=FLAGS.output_len, min_new_tokens=FLAGS.output_len,
                                       eos_token_id=None, pad_token_id=0, output_logits=True,
                                       return_dict_in_generate=True)
    want = torch.stack(out.logits, 1).float().log_softmax(-1).numpy()         # [B, steps, V]
    theirs = out.sequences[:, x.shape[1]:].tolist()
    ids = [engine.submit(p, SamplingParams(max_new_tokens=FLAGS.output_len, logprobs=k)) for p in prompts]
    for _ in engine.stream():
        pass
    diffs, same_ids, steps = [], 0, 0
    for b, rid in enumerate(ids):
        seq = engine.requests[rid]
        for t, lp in enumerate(seq.logprobs):
            if seq.output[:t + 1] != theirs[b][:t + 1]:
                break
            diffs += [abs(v - want[b, t, j]) for j, v in lp.top]
            same_ids += [j for j, _ in lp.top] == np.argsort(-want[b, t])[:k].tolist()
            steps += 1
        engine.forget(rid)
    return {"k": k, "steps": steps, "max_abs_diff": float(max(diffs)), "top_ids_agree": same_ids / steps}


def summary(runs: list[float]) -> dict:
    return {"tok_s": statistics.median(runs), "tok_s_min": min(runs), "tok_s_max": max(runs), "runs": runs}


def main(argv):
    del argv
    import numpy as np
    if FLAGS.checkpoint is None and FLAGS.model is None:
        FLAGS.checkpoint = write_checkpoint(FLAGS.peer_checkpoint_dir)
    if FLAGS.model is not None:
        sys.exit("error: peer_bench compares against transformers on a checkpoint; give --checkpoint (or neither)")
    cfg, params, path, _, engine_cfg = serving_flags.start()
    rng = np.random.default_rng(FLAGS.seed)
    batches = {b: [rng.integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist() for _ in range(b)]
               for b in map(int, FLAGS.batch_sizes)}
    from tarragon_jax.heap import freeze_startup_heap
    from tarragon_jax.serving.engine import Engine
    configs = {"resilience_on": engine_cfg}
    if FLAGS.compare_resilience_off:
        configs["resilience_off"] = serving_flags.engine_config(resilience=False)
    if FLAGS.compare_pingpong:
        configs["pingpong_flipped"] = serving_flags.engine_config(pingpong=not FLAGS.pingpong)
    if FLAGS.compare_eplb:
        configs["eplb_flipped"] = serving_flags.engine_config(eplb=not FLAGS.eplb)
    engines = {mode: Engine(cfg, params, c, serving_flags.cache_config()) for mode, c in configs.items()}
    freeze_startup_heap()                        # as launch/serve.py does once warm
    peer, ours = {}, {mode: {} for mode in engines}
    try:
        for b, prompts in batches.items():      # every system's passes interleaved: drift hits all alike
            run_transformers(path, prompts)                                          # untimed
            for engine in engines.values():
                run_engine(engine, prompts)                                          # untimed: compiles
            runs = {"transformers": []} | {mode: [] for mode in engines}
            for _ in range(FLAGS.repeats):
                runs["transformers"].append(run_transformers(path, prompts))
                for mode, engine in engines.items():
                    runs[mode].append(run_engine(engine, prompts))
            peer[b] = ([r[0] for r in runs["transformers"]], runs["transformers"][-1][1])
            for mode in engines:
                ours[mode][b] = ([r[0] for r in runs[mode]], runs[mode][-1][1])
        check = logprob_check(engines["resilience_on"], path, batches[min(batches)])
    finally:
        for engine in engines.values():
            engine.close()
    rows = []
    for b in batches:
        row = {"batch": b, "transformers": summary(peer[b][0])}
        for mode, res in ours.items():
            row[f"tarragon_{mode}"] = summary(res[b][0])
            row[f"ratio_{mode}"] = row[f"tarragon_{mode}"]["tok_s"] / row["transformers"]["tok_s"]
            same = [a == t for o, p in zip(res[b][1], peer[b][1]) for a, t in zip(o, p)]
            row[f"tokens_agree_{mode}"] = sum(same) / len(same)
        for mode in ("resilience_off", "pingpong_flipped", "eplb_flipped"):
            if mode in ours:
                row[f"resilience_on_over_{mode}"] = row["tarragon_resilience_on"]["tok_s"] / row[f"tarragon_{mode}"]["tok_s"]
        rows.append(row)
    torch, transformers = _torch()
    from tarragon_jax.model.weights import sizes
    n_params = sum(__import__("jax").tree.leaves(sizes(cfg)))
    print(f"{cfg.family}, {n_params / 1e6:.0f}M params, d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_experts} experts top-{cfg.top_k}, {FLAGS.dtype}; prompt {FLAGS.prompt_len}, output "
          f"{FLAGS.output_len}, median of {FLAGS.repeats}; ours: {FLAGS.num_attention_workers} AWs x "
          f"{FLAGS.num_expert_workers} EWs, runtime {FLAGS.runtime}; transformers {transformers.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    labels = {"resilience_on": "tarragon (resilience on)", "resilience_off": "tarragon (off)",
              "pingpong_flipped": f"tarragon (pingpong {'off' if FLAGS.pingpong else 'on'})",
              "eplb_flipped": f"tarragon ({'no' if FLAGS.eplb else ''}eplb)"}
    head = f"{'batch':>5} {'transformers':>20}"
    for mode in ours:
        head += f" {labels[mode]:>26} {'ratio':>6}" + ("" if mode == "resilience_on" else f" {'on / this':>9}")
    print(head + f" {'tokens agree':>12}")
    fmt = lambda s: f"{s['tok_s']:7.1f} ({s['tok_s_min']:.0f}-{s['tok_s_max']:.0f})"
    for r in rows:
        line = f"{r['batch']:5d} {fmt(r['transformers']):>20}"
        for mode in ours:
            line += f" {fmt(r[f'tarragon_{mode}']):>26} {r[f'ratio_{mode}']:6.2f}"
            if mode != "resilience_on":
                line += f" {r[f'resilience_on_over_{mode}']:9.3f}"
        print(line + f" {min(r[f'tokens_agree_{m}'] for m in ours):12.3f}")
    print(f"logprobs: top-{check['k']} of {check['steps']} greedy tokens (B={min(batches)}) within "
          f"{check['max_abs_diff']:.2e} of transformers' log-softmax; top-{check['k']} ids in the same order at "
          f"{check['top_ids_agree']:.1%} of them")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"config": {"checkpoint": path, "params": n_params, "dtype": FLAGS.dtype,
                                  "num_attention_workers": FLAGS.num_attention_workers,
                                  "num_expert_workers": FLAGS.num_expert_workers, "runtime": FLAGS.runtime,
                                  "pingpong": FLAGS.pingpong,
                                  "prompt_len": FLAGS.prompt_len, "output_len": FLAGS.output_len,
                                  "repeats": FLAGS.repeats, "transformers": transformers.__version__,
                                  "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
                       "rows": rows, "logprobs": check}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
