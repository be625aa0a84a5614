"""Serving over HTTP, as clients see it: `python -m launch.serving_bench --model tiny --fail_at ew1@1,aw0@2`.

Starts launch/serve.py as its own process with this run's serving flags (or drives --url) and
sends --num_requests streaming requests with the official openai client (chat, or completions
with --api completions), arriving as a Poisson process at --request_rate per second. Passes:

  warmup       untimed; compiles, and its texts are the failure-free reference
  no_failure   timed
  failures     timed, with every --fail_at kill sent through POST /fail at its second

Per pass: TTFT, inter-token latency (gaps between text chunks) and end-to-end latency
percentiles, output tokens/s (completion tokens over the pass's wall time), errors, and whether
every text equals the reference's. Prints a table and writes --json_out.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from . import serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "Drive this running server (its /fail needs --allow_fault_injection) instead of "
                    "starting launch/serve.py.")
flags.DEFINE_enum("api", "chat", ["chat", "completions"], "Which OpenAI API the clients call.")
flags.DEFINE_integer("num_requests", 64, "Requests per pass.")
flags.DEFINE_float("request_rate", 32.0, "Mean arrivals per second (a Poisson process); 0: all at once.")
flags.DEFINE_integer("input_len", 32, "Prompt length in words (random, from a fixed list).")
flags.DEFINE_integer("output_len", 32, "max_tokens of every request.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (each request also has its own seed).")
flags.DEFINE_list("fail_at", [], "worker@seconds after the failures pass starts, e.g. ew1@1.0,aw0@2.5; empty: no "
                  "failures pass.")
flags.DEFINE_integer("seed", 0, "Prompts, arrivals and sampling seeds.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial "
         "sphinx of black quartz and judge my vow").split()


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")
    return {"p50": pick(50), "p90": pick(90), "p99": pick(99)}


def workload(n: int, seed: int) -> list[dict]:
    """Prompts, arrival offsets (seconds) and sampling seeds, the same in every pass."""
    import numpy as np
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / FLAGS.request_rate, n) if FLAGS.request_rate > 0 else np.zeros(n)
    return [{"prompt": " ".join(rng.choice(WORDS, FLAGS.input_len)), "at": float(t), "seed": int(rng.integers(1 << 30))}
            for t in np.cumsum(gaps) - gaps[0]]


async def one(client, model: str, job: dict, t0: float) -> dict:
    """One streaming request: its text, completion tokens, TTFT, text-chunk gaps, end-to-end time."""
    await asyncio.sleep(max(0.0, t0 + job["at"] - time.perf_counter()))
    start, chunks, text, tokens = time.perf_counter(), [], "", 0
    kw = dict(model=model, max_tokens=FLAGS.output_len, temperature=FLAGS.temperature, seed=job["seed"],
              stream=True, stream_options={"include_usage": True})
    try:
        if FLAGS.api == "chat":
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": job["prompt"]}], **kw)
        else:
            stream = await client.completions.create(prompt=job["prompt"], **kw)
        async for c in stream:
            if c.usage is not None:
                tokens = c.usage.completion_tokens
            if not c.choices:
                continue
            delta = c.choices[0].delta.content if FLAGS.api == "chat" else c.choices[0].text
            if delta:
                chunks.append(time.perf_counter())
                text += delta
    except Exception as e:  # noqa: BLE001 -- counted and shown, the pass goes on
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
        return {"error": f"{type(e).__name__}: {e}{cause}", "t": time.perf_counter(), "after_s": time.perf_counter() - start,
                "tokens_before": len(chunks)}
    end = time.perf_counter()
    return {"text": text, "tokens": tokens, "ttft_s": chunks[0] - start if chunks else end - start,
            "gaps_s": [b - a for a, b in zip(chunks, chunks[1:])], "e2e_s": end - start, "end": end}


async def kill(url: str, worker: str, at: float, t0: float) -> dict:
    import httpx
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(url + "/fail", json={"worker": worker})
    return {"worker": worker, "at_s": at, "status": r.status_code, "answer": r.json()}


async def run_pass(url: str, model: str, jobs: list[dict], name: str, kills: list[tuple[str, float]]) -> dict:
    import openai
    from tqdm.asyncio import tqdm
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        killers = [asyncio.create_task(kill(url, w, at, t0)) for w, at in kills]
        results = await tqdm.gather(*[one(client, model, job, t0) for job in jobs], desc=name, file=sys.stderr)
    done = [r for r in results if "error" not in r]
    wall = max((r["end"] for r in done), default=t0) - t0
    return {"name": name, "requests": len(jobs), "errors": [r["error"] for r in results if "error" in r],
            "wall_s": wall, "output_tokens": sum(r["tokens"] for r in done),
            "throughput_tok_s": sum(r["tokens"] for r in done) / max(wall, 1e-9),
            "ttft_s": percentiles([r["ttft_s"] for r in done]), "itl_s": percentiles([g for r in done for g in r["gaps_s"]]),
            "e2e_s": percentiles([r["e2e_s"] for r in done]), "kills": list(await asyncio.gather(*killers)),
            "texts": [r.get("text") for r in results]}


def start_server() -> tuple[subprocess.Popen, str]:
    """launch/serve.py with this run's serving flags on a free port: (process, url) once it listens."""
    argv = [FLAGS[f.name].serialize() for f in FLAGS.get_flags_for_module(serving_flags)]
    cmd = [sys.executable, "-m", f"{__package__}.serve", "--port=0", "--allow_fault_injection", *[a for a in argv if a]]
    # launch.serve in the repository, tarragon_jax.launch.serve installed: run from the folder above the package
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * len(__package__.split("."))))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}     # the launcher sets it itself
    proc = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        print(line, end="", file=sys.stderr)
        if line.startswith("serving "):       # from now on its log goes on to ours, never filling the pipe
            threading.Thread(target=lambda: [print(x, end="", file=sys.stderr) for x in proc.stderr],
                             daemon=True).start()
            return proc, re.search(r"http://\S+", line).group(0)
    raise SystemExit(f"error: launch/serve.py exited ({proc.wait()}) before listening")


def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Ctrl-C, as a user stops it; killed if it has not exited within grace_s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(f"launch/serve.py did not exit within {grace_s:.0f} s of SIGINT: killed", file=sys.stderr)
        proc.kill()
        proc.wait()


def table(passes: list[dict]) -> str:
    head = f"{'pass':<11}{'ok':>6}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'E2E p50':>9}{'texts':>11}"
    rows = [head]
    for p in passes:
        ms = lambda d, q: f"{1e3 * d[q]:.0f}ms"
        rows.append(f"{p['name']:<11}{p['requests'] - len(p['errors']):>6}{p['throughput_tok_s']:>9.1f}"
                    f"{ms(p['ttft_s'], 'p50'):>10}{ms(p['ttft_s'], 'p99'):>8}{ms(p['itl_s'], 'p50'):>9}"
                    f"{ms(p['itl_s'], 'p99'):>8}{ms(p['e2e_s'], 'p50'):>9}"
                    f"{str(p.get('texts_identical', 'reference')):>11}")
    return "\n".join(rows)


def main(argv):
    del argv
    import logging
    logging.getLogger().setLevel(logging.WARNING)     # the HTTP clients log one line per request otherwise
    kills = []
    for spec in FLAGS.fail_at:
        worker, _, at = spec.partition("@")
        if not re.fullmatch(r"(aw|ew)\d+", worker) or not re.fullmatch(r"\d+(\.\d*)?", at):
            raise app.UsageError(f"--fail_at {spec!r}: expected worker@seconds, e.g. ew1@1.5")
        kills.append((worker, float(at)))
    proc, url = (None, FLAGS.url.rstrip("/")) if FLAGS.url else start_server()
    try:
        import openai
        model = openai.OpenAI(base_url=url + "/v1", api_key="unused").models.list().data[0].id
        jobs = workload(FLAGS.num_requests, FLAGS.seed)
        passes = [asyncio.run(run_pass(url, model, jobs, name, k))
                  for name, k in [("warmup", []), ("no_failure", [])] + ([("failures", kills)] if kills else [])]
    finally:
        if proc is not None:
            stop_server(proc)
    reference = passes[0]["texts"]
    for p in passes[1:]:
        p["texts_identical"] = not p["errors"] and p["texts"] == reference
        p["texts_differing"] = sum(a != b for a, b in zip(p["texts"], reference))
    for p in passes:
        del p["texts"]
    print(table(passes))
    for p in passes:
        for e in p["errors"][:3]:
            print(f"{p['name']}: error: {e}")
        for k in p["kills"]:
            print(f"{p['name']}: killed {k['worker']} at {k['at_s']} s: HTTP {k['status']} {k['answer']}")
    if FLAGS.json_out:
        config = {k: getattr(FLAGS, k) for k in ("api", "num_requests", "request_rate", "input_len", "output_len",
                                                  "temperature", "fail_at", "seed", "url")}
        with open(FLAGS.json_out, "w") as f:
            json.dump({"config": config, "model": model, "passes": passes}, f, indent=1)
    if any(p.get("texts_identical") is False for p in passes):
        sys.exit(1)


def run() -> None:
    """The console script (pyproject.toml)."""
    app.run(main)


if __name__ == "__main__":
    run()
