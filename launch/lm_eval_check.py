"""lm-evaluation-harness against the server: `python -m launch.lm_eval_check --model demo`.

Serves the checkpoint (in this process, on a free port) and runs lm-eval's `local-completions`
backend against it on a small local multiple-choice task (launch/lm_eval_task: endings of
sentences of Python's help texts; no hub download). lm-eval scores each choice's
loglikelihood the way it scores any OpenAI-compatible server: `echo` with `logprobs` and
`max_tokens` 0, tokenizing through the server's /tokenize. With --hf it runs lm-eval's own `hf`
backend (transformers, torch: requirements-dev.txt) on the same checkpoint too; with
--reference it compares with an earlier run's JSON instead. Reports accuracy and the largest
per-choice loglikelihood difference; writes JSON (every choice's loglikelihood).
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import json
import os
import sys
import tempfile

from absl import app, flags

from . import serving_flags

flags.DEFINE_integer("limit", None, "Score only the first N examples.")
flags.DEFINE_bool("hf", False, "Also run lm-eval's hf backend (transformers) on the checkpoint and compare.")
flags.DEFINE_string("reference", None, "Compare with this earlier run's --json_out (its hf results).")
flags.DEFINE_float("tolerance", 1e-3, "Largest per-choice loglikelihood difference that agrees.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS

TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_task")
TASK = "pyhelp_endings"


def _task_dir() -> str:
    """The task's YAML with its data file's absolute path, in a temporary folder."""
    with open(os.path.join(TASK_DIR, f"{TASK}.yaml")) as f:
        text = f.read().replace("DATA_FILE", os.path.join(TASK_DIR, f"{TASK}.jsonl"))
    out = tempfile.mkdtemp(prefix="tarragon_lm_eval_")
    with open(os.path.join(out, f"{TASK}.yaml"), "w") as f:
        f.write(text)
    return out


def evaluate(model: str, model_args: dict) -> dict:
    """{"acc", "loglikelihoods": per example, per choice} of one lm-eval run."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # local data and checkpoint only: never the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=FLAGS.limit,
                                  task_manager=TaskManager(include_path=_task_dir()), log_samples=True,
                                  batch_size=1)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return {"acc": out["results"][TASK]["acc,none"],
            "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples],
            "correct": [int(s["acc"]) for s in samples]}


def main(argv):
    del argv
    cfg, params, ckpt, reload, engine_cfg = serving_flags.start()
    from tarragon_jax.serving.engine import Engine
    from tarragon_jax.serving.engine_loop import EngineLoop
    from tarragon_jax.serving.server import Server
    if not ckpt:
        sys.exit("error: lm_eval_check needs a checkpoint with a tokenizer (--model demo or --checkpoint DIR)")
    tokenizer = serving_flags.tokenizer(ckpt, cfg)
    eos = serving_flags.eos_ids(ckpt, tokenizer)
    engine = Engine(cfg, params, engine_cfg, serving_flags.cache_config(), load_params=reload,
                    vocab=serving_flags.vocabulary(tokenizer, eos, cfg))
    loop = EngineLoop(engine)
    loop.start()
    server = Server(loop, port=0, tokenizer=tokenizer, model_name="checked", eos_ids=eos, max_unfinished=None).start()
    try:
        ours = evaluate("local-completions", {"model": "checked", "base_url": server.url + "/v1/completions",
                                              "tokenizer_backend": "remote", "num_concurrent": 1, "max_retries": 1})
    finally:
        server.shutdown()
        loop.stop()
        engine.close()
    result = {"checkpoint": os.path.relpath(ckpt), "limit": FLAGS.limit, "server": ours}
    if FLAGS.hf:
        result["hf"] = evaluate("hf", {"pretrained": ckpt, "dtype": "float32", "device": "cpu"})
    elif FLAGS.reference:
        with open(FLAGS.reference) as f:
            ref = json.load(f)["hf"]
        n = len(ours["loglikelihoods"])
        result["hf"] = {"acc": None, "loglikelihoods": ref["loglikelihoods"][:n], "correct": ref["correct"][:n]}
    print(f"{TASK} ({len(ours['loglikelihoods'])} examples), {cfg.family} at {os.path.relpath(ckpt)}")
    print(f"{'run':>20} {'acc':>6}")
    print(f"{'server (local-completions)':>20} {ours['acc']:6.3f}")
    if "hf" in result:
        hf = result["hf"]
        diff = max(abs(a - b) for x, y in zip(ours["loglikelihoods"], hf["loglikelihoods"]) for a, b in zip(x, y))
        same = ours["correct"] == hf["correct"]
        result.update(max_abs_diff=diff, same_answers=same, agree=diff <= FLAGS.tolerance and same)
        if hf["acc"] is not None:
            print(f"{'hf (transformers)':>20} {hf['acc']:6.3f}")
        print(f"largest per-choice loglikelihood difference {diff:.2e}; same correct examples: {same}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump(result, fh, indent=1)
    if not result.get("agree", True):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
