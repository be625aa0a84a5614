"""Structured outputs end to end: `python -m launch.structured_bench --model demo`.

--num_requests prompts, all at once, each asking for JSON following a schema (SCHEMA: strings,
bounded integers, an enum, a boolean, an array), sampled at --temperature; counts the answers
that end with EOS, parse as JSON and validate against the schema (jsonschema-style checks done
here, by hand: the schema is fixed), and the output tokens/s. Prints a table, writes JSON.
Throughput with a grammar against without: `launch.throughput_bench --compare_grammar`.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import json
import sys
import time

from absl import app, flags

from . import serving_flags

flags.DEFINE_integer("num_requests", 64, "Requests, submitted at once.")
flags.DEFINE_integer("prompt_len", 16, "Random prompt tokens per request.")
flags.DEFINE_integer("max_new_tokens", 160, "Token limit per answer (a schema's answer ends well before it).")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")
flags.DEFINE_integer("seed", 0, "Prompt and sampling seed.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "kind": {"enum": ["function", "class", "module"]},
    "arity": {"type": "integer", "minimum": 0, "maximum": 9},
    "pure": {"type": "boolean"},
    "args": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "kind", "arity", "pure", "args"], "additionalProperties": False}


def follows(text: str) -> tuple[bool, bool]:
    """(parses as JSON, follows SCHEMA)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False, False
    p = SCHEMA["properties"]
    ok = (isinstance(obj, dict) and set(obj) == set(p) and isinstance(obj["name"], str)
          and len(obj["name"]) <= 24 and obj["kind"] in p["kind"]["enum"] and type(obj["arity"]) is int
          and 0 <= obj["arity"] <= 9 and type(obj["pure"]) is bool and isinstance(obj["args"], list)
          and len(obj["args"]) <= 4 and all(isinstance(a, str) and len(a) <= 12 for a in obj["args"]))
    return True, ok


def main(argv):
    del argv
    cfg, params, ckpt, reload, engine_cfg = serving_flags.start()
    import numpy as np
    from tarragon_jax.config import SamplingParams
    from tarragon_jax.serving.engine import Engine
    from tarragon_jax.workers.grammar import json_grammar
    tokenizer = serving_flags.tokenizer(ckpt, cfg)
    if tokenizer is None:
        sys.exit("error: structured outputs need a tokenizer (the checkpoint's tokenizer.json)")
    eos = serving_flags.eos_ids(ckpt, tokenizer)
    engine = Engine(cfg, params, engine_cfg, serving_flags.cache_config(), load_params=reload,
                    vocab=serving_flags.vocabulary(tokenizer, eos, cfg))
    rng = np.random.default_rng(FLAGS.seed)
    prompts = [rng.integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist() for _ in range(FLAGS.num_requests)]
    grammar = json_grammar(SCHEMA)
    try:
        t0 = time.perf_counter()
        ids = [engine.submit(p, SamplingParams(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                                               seed=FLAGS.seed + i, grammar=grammar)) for i, p in enumerate(prompts)]
        for _ in engine.stream():
            pass
        secs = time.perf_counter() - t0
    finally:
        engine.close()
    seqs = [engine.requests[i] for i in ids]
    ended = [s.finish_reason == "stop" for s in seqs]
    texts = [tokenizer.decode([t for t in s.output if t not in eos]) for s in seqs]
    checks = [follows(t) for t in texts]
    n_tokens = sum(len(s.output) for s in seqs)
    result = {"requests": len(seqs), "ended_with_eos": sum(ended), "parsed": sum(p for p, _ in checks),
              "valid": sum(v for _, v in checks), "output_tokens": n_tokens, "seconds": secs,
              "tok_s": n_tokens / secs, "examples": texts[:3],
              "config": {k: FLAGS[k].value for k in ("num_requests", "prompt_len", "max_new_tokens", "temperature", "seed")}}
    print(f"{cfg.family}, {FLAGS.num_requests} requests at once, JSON schema, temperature {FLAGS.temperature}")
    print(f"{'requests':>9} {'ended (EOS)':>12} {'parse':>6} {'valid':>6} {'tokens':>7} {'tok/s':>8}")
    print(f"{result['requests']:9d} {result['ended_with_eos']:12d} {result['parsed']:6d} {result['valid']:6d} "
          f"{n_tokens:7d} {result['tok_s']:8.1f}")
    for t in texts[:3]:
        print(f"  {t}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
