"""What the HTTP tests share: a tiny engine behind one or more servers on free ports, launch/serve.py
as a process, and a JSON request helper that returns (status, body) for errors too."""
import contextlib
import json
import time
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

from tarragon_jax.config import CacheConfig, EngineConfig
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.serving.engine_loop import EngineLoop
from tarragon_jax.serving.server import Server
from tarragon_jax.workers.grammar import Vocabulary


@contextlib.contextmanager
def serving(family: str, seed: int, cache: dict | None = None, vocab=None, **servers):
    """Yields (cfg, params, loop, {name: (Server, url)}), one Server per keyword (its kwargs),
    all on one engine loop: 2 AWs x 3 EWs, small pages so requests span several (cache: other
    CacheConfig fields; vocab: (tokenizer, eos ids) structured outputs follow)."""
    cfg, params = tiny_model(family, seed=seed)
    engine = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=3, prefill_chunk=8),
                    CacheConfig(**(cache or dict(page_size=4, num_pages=64))),
                    vocab=vocab and Vocabulary(vocab[0].to_str(), tuple(vocab[1]), cfg.vocab_size))
    loop = EngineLoop(engine)
    loop.start()
    started = {name: Server(loop, port=0, **kw).start() for name, kw in servers.items()}
    try:
        yield cfg, params, loop, {k: (s, s.url) for k, s in started.items()}
    finally:
        for s in started.values():
            s.shutdown()
        loop.stop()
        engine.close()


def wait_until(pred, what: str, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while not pred():
        assert time.time() < deadline, what
        time.sleep(0.05)


def request(url: str, body=None, raw: bytes | None = None) -> tuple[int, str]:
    """GET without a body, else POST JSON (or raw bytes); (status, body text) also for 4xx/5xx."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def launch_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """launch/serve.py --model tiny as a user starts it (fresh process, free port): (process, url)
    once it listens. Its stderr stays open for the caller to read."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}     # the launcher sets it itself
    proc = subprocess.Popen([sys.executable, "-m", "launch.serve", "--model", "tiny", "--port", "0", *flags],
                            cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            raise AssertionError("server exited before listening")
    return proc, re.search(r"http://\S+", line).group(0)
