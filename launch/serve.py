"""Serve the engine over HTTP: `python -m launch.serve --model tiny --port 8000`.

  curl -s localhost:8000/generate -d '{"prompt_ids": [1, 2, 3], "max_new_tokens": 16}'
  curl -sN localhost:8000/generate -d '{"prompt": "Hello", "stream": true}'    # with tokenizer.json
  curl -s localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 16, "temperature": 0}'
  curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
  curl -s localhost:8000/metrics                         # Prometheus
  curl -s localhost:8000/health
  curl -s localhost:8000/fail -d '{"worker": "ew1"}'     # with --allow_fault_injection: no token changes

Endpoints, limits and errors: tarragon_jax/serving/server.py. Without a checkpoint (--model tiny)
the embedded model speaks through a byte-level tokenizer with a ChatML template. All serving flags (layout, runtime, recovery,
--precompile, ...) are the shared ones of launch/serving_flags.py.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import faulthandler
import os
import signal
import sys
import threading

from absl import app, flags

from . import serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
flags.DEFINE_bool("allow_fault_injection", False, "Enable POST /fail (kill a worker on demand; for demos).")
flags.DEFINE_string("api_key", None, "Every endpoint but /health and /metrics needs 'Authorization: Bearer KEY' "
                    "(default: the TARRAGON_API_KEY environment variable; unset: no key).")
flags.DEFINE_integer("max_unfinished_requests", -1, "Requests in flight past which new ones get 429 (-1: one "
                     "per KV page of the AWs; 0: no limit).")
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Request bodies over this get 413.")
flags.DEFINE_float("header_timeout_s", 10.0, "Request line and headers not complete within this: 408.")
flags.DEFINE_float("body_timeout_s", 10.0, "Request body not complete within this: 408.")
flags.DEFINE_float("health_timeout_s", 5.0, "/health answers 503 when the engine loop does not answer within "
                   "this (a stuck step).")
flags.DEFINE_float("drain_timeout_s", 30.0, "On SIGTERM: refuse new requests (503) and wait this long for the "
                   "ones in flight before exiting.")
flags.DEFINE_string("served_model_name", None, "The model name of the OpenAI API (default: the checkpoint "
                    "directory's name, or the --model name).")


def main(argv):
    faulthandler.register(signal.SIGUSR1)      # `kill -USR1 PID`: every thread's stack on stderr
    del argv
    cfg, params, ckpt, reload, engine_cfg = serving_flags.start()
    from tarragon_jax.config import ConfigError
    from tarragon_jax.heap import freeze_startup_heap
    from tarragon_jax.serving.engine import Engine
    from tarragon_jax.serving.engine_loop import EngineLoop
    from tarragon_jax.serving.server import AUTO, HttpLimits, Server
    tokenizer, template = serving_flags.tokenizer_and_template(ckpt, cfg)
    eos = serving_flags.eos_ids(ckpt, tokenizer)
    try:
        engine = Engine(cfg, params, engine_cfg, serving_flags.cache_config(), load_params=reload,
                        vocab=serving_flags.vocabulary(tokenizer, eos, cfg))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    loop = EngineLoop(engine)
    loop.start()
    name = FLAGS.served_model_name or (os.path.basename(os.path.normpath(ckpt)) if ckpt else FLAGS.model)
    limits = HttpLimits(FLAGS.max_body_bytes, FLAGS.header_timeout_s, FLAGS.body_timeout_s, FLAGS.health_timeout_s)
    server = Server(loop, FLAGS.host, FLAGS.port, tokenizer, FLAGS.allow_fault_injection, name, eos,
                    {-1: AUTO, 0: None}.get(FLAGS.max_unfinished_requests, FLAGS.max_unfinished_requests),
                    template, limits, FLAGS.api_key or os.environ.get("TARRAGON_API_KEY"))
    stopped = threading.Event()

    def drain_then_stop() -> None:
        finished = server.drain(FLAGS.drain_timeout_s)
        print("drained: every request finished" if finished else
              f"drain timed out after {FLAGS.drain_timeout_s} s", file=sys.stderr, flush=True)
        stopped.set()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=drain_then_stop, daemon=True).start())
    server.start()
    frozen = freeze_startup_heap()
    print(f"backends: {engine.backends()}", file=sys.stderr, flush=True)
    if engine.controller.precompile_s is not None:
        print(serving_flags.startup_line(engine), file=sys.stderr, flush=True)
    print(f"serving {cfg.family} ({FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs, "
          f"runtime {FLAGS.runtime}, chat {'on' if template else 'off'}, admission limit "
          f"{server.max_unfinished}, {frozen} start-up objects frozen) on {server.url}", file=sys.stderr, flush=True)
    try:
        while not stopped.wait(0.5):     # the main thread only waits: signals arrive here
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        loop.stop()
        engine.close()


def run() -> None:
    """The console script (pyproject.toml)."""
    app.run(main)


if __name__ == "__main__":
    run()
