"""Serving over HTTP, as clients see it: `python -m launch.serving_bench --model tiny --fail_at ew1@1,aw0@2`.

Starts launch/serve.py as its own process with this run's serving flags (or drives --url) and
sends --num_requests streaming requests with the official openai client (chat, or completions
with --api completions), arriving as a Poisson process at --request_rate per second. Passes:

  warmup       untimed; compiles, and its texts are the failure-free reference
  no_failure   timed
  failures     timed, with every --fail_at kill sent through POST /fail at its second

Workloads (--workload): random prompts; shared_prefix, a long system prompt (--prefix_len words)
before every short question (--input_len words); multi_turn, conversations of --turns turns, each
turn's prompt the whole conversation so far. Every pass starts with a cold prefix cache (POST
/reset_prefix_cache). --compare_prefix_caching runs the passes on a server with prefix caching and
then on one without, and checks that both give the same texts.

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
flags.DEFINE_enum("workload", "random", ["random", "shared_prefix", "multi_turn"],
                  "random: --input_len random words; shared_prefix: one system prompt of --prefix_len words before "
                  "every question of --input_len words; multi_turn: --num_requests / --turns conversations whose "
                  "every turn sends the conversation so far plus a new question.")
flags.DEFINE_integer("prefix_len", 300, "shared_prefix and multi_turn: words in the system prompt every request "
                     "starts with (multi_turn: 0 for none).")
flags.DEFINE_integer("turns", 4, "multi_turn: turns per conversation.")
flags.DEFINE_integer("max_concurrency", 0, "At most this many requests in flight (0: no limit); 1 sends them one "
                     "at a time.")
flags.DEFINE_bool("compare_prefix_caching", False, "Run the passes on a server with prefix caching, then on one "
                  "with --noenable_prefix_caching, side by side; their texts must be the same.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial "
         "sphinx of black quartz and judge my vow").split()


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")
    return {"p50": pick(50), "p90": pick(90), "p99": pick(99)}


def _words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def workload(n: int, seed: int) -> list[dict]:
    """The pass's jobs, the same in every pass: each a conversation (its user turns, one for
    random and shared_prefix), its system prompt (or None), when it starts (seconds) and its
    sampling seed."""
    import numpy as np
    rng = np.random.default_rng(seed)
    turns = FLAGS.turns if FLAGS.workload == "multi_turn" else 1
    n = max(1, n // turns)
    gaps = rng.exponential(1 / FLAGS.request_rate, n) if FLAGS.request_rate > 0 else np.zeros(n)
    system = _words(rng, FLAGS.prefix_len) if FLAGS.workload != "random" and FLAGS.prefix_len else None
    return [{"turns": [_words(rng, FLAGS.input_len) for _ in range(turns)], "system": system, "at": float(t),
             "seed": int(rng.integers(1 << 30))} for t in np.cumsum(gaps) - gaps[0]]


def opening(job: dict) -> list[dict]:
    """A job's first request: its system prompt, if any, and its first turn."""
    system = [{"role": "system", "content": job["system"]}] if job["system"] else []
    return system + [{"role": "user", "content": job["turns"][0]}]


async def conversation(client, model: str, job: dict, t0: float, gate: asyncio.Semaphore) -> list[dict]:
    """A job's turns one after another, each with the conversation so far; a failed turn ends it."""
    await asyncio.sleep(max(0.0, t0 + job["at"] - time.perf_counter()))
    messages = opening(job)[:-1]
    results = []
    for i, question in enumerate(job["turns"]):
        messages.append({"role": "user", "content": question})
        async with gate:
            r = await one(client, model, messages, job["seed"] + i)
        results.append(r)
        if "error" in r:
            break
        messages.append({"role": "assistant", "content": r["text"]})
    return results


async def one(client, model: str, messages: list[dict], seed: int) -> dict:
    """One streaming request: its text, completion tokens, TTFT, text-chunk gaps, end-to-end time."""
    start, chunks, text, tokens, prompt_tokens = time.perf_counter(), [], "", 0, 0
    kw = dict(model=model, max_tokens=FLAGS.output_len, temperature=FLAGS.temperature, seed=seed,
              stream=True, stream_options={"include_usage": True})
    try:
        if FLAGS.api == "chat":
            stream = await client.chat.completions.create(messages=messages, **kw)
        else:
            stream = await client.completions.create(prompt="\n".join(m["content"] for m in messages), **kw)
        async for c in stream:
            if c.usage is not None:
                tokens, prompt_tokens = c.usage.completion_tokens, c.usage.prompt_tokens
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
    return {"text": text, "tokens": tokens, "prompt_tokens": prompt_tokens, "ttft_s": chunks[0] - start if chunks else end - start,
            "gaps_s": [b - a for a, b in zip(chunks, chunks[1:])], "e2e_s": end - start, "end": end}


async def kill(url: str, worker: str, at: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    status, answer = await post(url, "/fail", {"worker": worker})
    return {"worker": worker, "at_s": at, "status": status, "answer": answer}


async def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    import httpx
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(url + path, json=body)
    return r.status_code, r.json()


async def prefix_counts(url: str) -> tuple[float, float]:
    """The server's prefix-cache counters: (prompt tokens looked up, tokens found cached).
    RuntimeError if /metrics does not answer them (an engine loop that stopped)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.get(url + "/metrics")
    if r.status_code != 200:
        raise RuntimeError(f"/metrics answered {r.status_code}: {r.text[:300]}")
    text = r.text
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return got.get("tarragon_prefix_cache_queries_total", 0.0), got.get("tarragon_prefix_cache_hit_tokens_total", 0.0)


async def run_pass(url: str, model: str, jobs: list[dict], name: str, kills: list[tuple[str, float]]) -> dict:
    import openai
    from tqdm.asyncio import tqdm
    await post(url, "/reset_prefix_cache", {})            # every pass starts cold
    queries, hits = await prefix_counts(url)
    gate = asyncio.Semaphore(FLAGS.max_concurrency or 1 << 30)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        killers = [asyncio.create_task(kill(url, w, at, t0)) for w, at in kills]
        convs = await tqdm.gather(*[conversation(client, model, job, t0, gate) for job in jobs], desc=name, file=sys.stderr)
    results = [r for c in convs for r in c]
    queries2, hits2 = await prefix_counts(url)
    done = [r for r in results if "error" not in r]
    wall = max((r["end"] for r in done), default=t0) - t0
    return {"name": name, "requests": sum(len(j["turns"]) for j in jobs), "errors": [r["error"] for r in results if "error" in r],
            "wall_s": wall, "output_tokens": sum(r["tokens"] for r in done),
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in done) / max(len(done), 1),
            "prefix_cache_hit_rate": (hits2 - hits) / max(queries2 - queries, 1),
            "throughput_tok_s": sum(r["tokens"] for r in done) / max(wall, 1e-9),
            "ttft_s": percentiles([r["ttft_s"] for r in done]), "itl_s": percentiles([g for r in done for g in r["gaps_s"]]),
            "e2e_s": percentiles([r["e2e_s"] for r in done]), "kills": list(await asyncio.gather(*killers)),
            "texts": [r.get("text") for r in results]}


def start_server(**overrides) -> tuple[subprocess.Popen, str]:
    """launch/serve.py with this run's serving flags (and `overrides`) on a free port: (process,
    url) once it listens."""
    argv = [FLAGS[f.name].serialize() for f in FLAGS.get_flags_for_module(serving_flags) if f.name not in overrides]
    argv += [f"--{k}={v}" for k, v in overrides.items()]
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
    head = f"{'pass':<15}{'ok':>6}{'prompt':>8}{'cached':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'E2E p50':>9}{'texts':>11}"
    rows = [head]
    for p in passes:
        ms = lambda d, q: f"{1e3 * d[q]:.0f}ms"
        rows.append(f"{p['name']:<15}{p['requests'] - len(p['errors']):>6}{p['prompt_tokens_mean']:>8.0f}"
                    f"{p['prefix_cache_hit_rate']:>8.0%}"
                    f"{p['throughput_tok_s']:>9.1f}"
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
    if FLAGS.url and FLAGS.compare_prefix_caching:
        raise app.UsageError("--compare_prefix_caching starts its own two servers: drop --url")
    jobs = workload(FLAGS.num_requests, FLAGS.seed)
    names = [("warmup", []), ("no_failure", [])] + ([("failures", kills)] if kills else [])
    settings = [("on", "true"), ("off", "false")] if FLAGS.compare_prefix_caching else [("", None)]
    passes = []
    for label, caching in settings:
        overrides = {} if caching is None else {"enable_prefix_caching": caching}
        proc, url = (None, FLAGS.url.rstrip("/")) if FLAGS.url else start_server(**overrides)
        try:
            import openai
            model = openai.OpenAI(base_url=url + "/v1", api_key="unused").models.list().data[0].id
            ran = [asyncio.run(run_pass(url, model, jobs, name, k)) for name, k in names]
        finally:
            if proc is not None:
                stop_server(proc)
        reference = ran[0]["texts"]
        for p in ran[1:]:
            p["texts_identical"] = not p["errors"] and p["texts"] == reference
            p["texts_differing"] = sum(a != b for a, b in zip(p["texts"], reference))
        for p in ran:
            p["name"] = f"{p['name']}/{label}" if label else p["name"]
        passes += ran
    if FLAGS.compare_prefix_caching:                      # caching on and off: the same texts, pass by pass
        n = len(names)
        for on, off in zip(passes[:n], passes[n:]):
            off["texts_identical"] = not off["errors"] and off["texts"] == on["texts"]
        on, off = passes[1], passes[n + 1]
        ratio = lambda a, b: a / b if b else float("nan")     # nan: a pass with no finished request
        ratios = {"ttft_p50_on_over_off": ratio(on["ttft_s"]["p50"], off["ttft_s"]["p50"]),
                  "throughput_on_over_off": ratio(on["throughput_tok_s"], off["throughput_tok_s"])}
    for p in passes:
        del p["texts"]
    print(table(passes))
    if FLAGS.compare_prefix_caching:
        print(f"no_failure, prefix caching on/off: TTFT p50 {ratios['ttft_p50_on_over_off']:.3f}x, "
              f"throughput {ratios['throughput_on_over_off']:.3f}x (texts identical: {passes[len(names) + 1]['texts_identical']})")
    for p in passes:
        for e in p["errors"][:3]:
            print(f"{p['name']}: error: {e}")
        for k in p["kills"]:
            print(f"{p['name']}: killed {k['worker']} at {k['at_s']} s: HTTP {k['status']} {k['answer']}")
    if FLAGS.json_out:
        config = {k: getattr(FLAGS, k) for k in ("api", "num_requests", "request_rate", "input_len", "output_len",
                                                  "temperature", "fail_at", "seed", "url", "workload", "prefix_len",
                                                  "turns", "max_concurrency", "compare_prefix_caching")}
        with open(FLAGS.json_out, "w") as f:
            json.dump({"config": config, "model": model, "passes": passes,
                       **({"prefix_caching_ratios": ratios} if FLAGS.compare_prefix_caching else {})}, f, indent=1)
    if any(p.get("texts_identical") is False for p in passes):
        sys.exit(1)


def run() -> None:
    """The console script (pyproject.toml)."""
    app.run(main)


if __name__ == "__main__":
    run()
