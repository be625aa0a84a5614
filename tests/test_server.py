"""The HTTP front end, as a client sees it: concurrent requests get the reference's tokens,
streaming sends each token as it is made, bad requests get 400 with the reason and disturb
nothing, and a worker killed through /fail mid-run changes no token."""
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from serving import launch_server, request, serving, wait_until
from tarragon_jax.config import SamplingParams
from tarragon_jax.model import reference
from seeding import fresh_rng


@pytest.fixture(scope="module")
def served():
    with serving("qwen3_moe", 21, main=dict(allow_faults=True)) as (cfg, params, loop, servers):
        yield cfg, params, servers["main"][1], loop


def test_concurrent_requests_and_a_kill_mid_run(served):
    cfg, params, url, _ = served
    rng = fresh_rng()
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 12, 3, 9)]
    results = {}

    def client(i):
        results[i] = request(url + "/generate", {"prompt_ids": prompts[i], "max_new_tokens": 24})
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    code, body = request(url + "/fail", {"worker": "ew1"})
    assert code == 200 and json.loads(body) == {"killed": "ew1"}
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        code, body = results[i]
        assert code == 200, body
        assert json.loads(body)["output_ids"] == reference.greedy_generate(cfg, params, p, 24)
    with urllib.request.urlopen(url + "/health") as r:
        health = json.loads(r.read())
    assert [rec["worker"] for rec in health["recoveries"]] == ["ew1"]
    assert {p["pid"] for p in health["processes"].values()} == {os.getpid()}      # local: all in this process
    assert set(health["processes"]) == set(health["workers"]) | {"driver"} and health["recoveries"][0]["process"]["devices"]
    assert health["unfinished_requests"] == 0


def test_streaming_sends_tokens_then_a_summary(served):
    cfg, params, url, _ = served
    code, body = request(url + "/generate", {"prompt_ids": [4, 5, 6], "max_new_tokens": 6, "stream": True})
    lines = [json.loads(line) for line in body.splitlines()]
    assert code == 200 and [x["index"] for x in lines[:-1]] == list(range(6))
    want = reference.greedy_generate(cfg, params, [4, 5, 6], 6)
    assert [x["token"] for x in lines[:-1]] == want == lines[-1]["output_ids"]
    assert lines[-1]["finished"] and lines[-1]["finish_reason"]


def test_generate_takes_penalties_and_a_logit_bias(served):
    cfg, params, url, _ = served
    sp = SamplingParams(max_new_tokens=6, frequency_penalty=1.3, repetition_penalty=1.2, logit_bias=((11, 5.0),))
    code, body = request(url + "/generate", {"prompt_ids": [4, 5, 6, 4], "max_new_tokens": 6, "frequency_penalty": 1.3,
                                             "repetition_penalty": 1.2, "logit_bias": {"11": 5.0}})
    assert code == 200 and json.loads(body)["output_ids"] == reference.greedy_generate(cfg, params, [4, 5, 6, 4], 6, sp)


@pytest.mark.parametrize("body,raw,message", [
    (None, b"{not json", "malformed JSON"),
    ({"prompt_ids": [1, 2], "logit_bias": [[3, 1.0]]}, None, '"logit_bias" must map token ids'),
    ({"prompt_ids": [1, 2], "presence_penalty": -3}, None, "presence_penalty must be"),
    ({"prompt_ids": [1, 2], "max_tokens": 3}, None, "unknown field"),
    ({"prompt_ids": [1, 2], "prompt": "hi"}, None, "exactly one of"),
    ({"prompt": "hello"}, None, "needs a tokenizer"),
    ({"prompt_ids": [5] * 2000}, None, "prompt too long"),
    ({"prompt_ids": [1, 99999]}, None, "out of range"),
    ({"prompt_ids": [1, 2], "temperature": -1}, None, "temperature"),
    ({"prompt_ids": [1, 2], "seed": -1}, None, "seed must be"),
    ({"prompt_ids": [1, 2], "max_new_tokens": 2.5}, None, "max_new_tokens must be"),
    ({"prompt_ids": [1, 2], "stop_token_ids": 5}, None, "stop_token_ids"),
    ({"prompt_ids": [1.0, 2]}, None, "list of integers"),
    ({"prompt_ids": [1, 2], "stream": "yes"}, None, "stream"),
])
def test_bad_requests_get_400_with_the_reason(served, body, raw, message):
    _, _, url, _ = served
    code, text = request(url + "/generate", body, raw)
    assert code == 400 and message in json.loads(text)["error"]["message"]


def test_unknown_worker_and_endpoint(served):
    _, _, url, _ = served
    code, text = request(url + "/fail", {"worker": "ew9"})
    assert code == 400 and "must be one of" in text
    assert request(url + "/fail", {"worker": "aw0"})[0] == 200
    code, text = request(url + "/fail", {"worker": "aw1"})                 # the last live AW
    assert code == 400 and "last live AW" in text
    def aw0_records():
        with urllib.request.urlopen(url + "/health") as r:
            return [x for x in json.loads(r.read())["recoveries"] if x["worker"] == "aw0"]
    wait_until(aw0_records, "idle AW failure never detected")           # found while idle, by heartbeat
    assert aw0_records()[0]["detected_by"] == "heartbeat"
    assert request(url + "/nothing", {})[0] == 404


def test_serve_launcher_end_to_end():
    """launch/serve.py as a user runs it: a fresh process on a free port, one request, Ctrl-C."""
    proc, url = launch_server()
    try:
        code, body = request(url + "/generate", {"prompt_ids": [1, 2, 3], "max_new_tokens": 5})
        assert code == 200 and len(json.loads(body)["output_ids"]) == 5
        code, body = request(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})
        assert code == 200 and json.loads(body)["model"] == "tiny", body
        assert json.loads(body)["usage"]["completion_tokens"] == 4
        assert request(url + "/fail", {"worker": "ew0"})[0] == 403          # off unless asked for
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _cancels(loop, monkeypatch) -> list:
    """Request ids the engine is asked to cancel from now on (the wrapper goes with the test)."""
    seen, cancel = [], loop.engine.cancel
    monkeypatch.setattr(loop.engine, "cancel", lambda rid: seen.append(rid) or cancel(rid))
    return seen


def test_a_streaming_client_that_leaves_cancels_its_request(served, monkeypatch):
    _, _, url, loop = served
    cancelled = _cancels(loop, monkeypatch)
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/generate", json.dumps({"prompt_ids": [7, 8, 9], "max_new_tokens": 240, "stream": True}))
    resp = conn.getresponse()
    assert json.loads(resp.readline())["index"] == 0
    rid = loop.call(lambda e: max(e.requests))
    resp.close()
    conn.close()                                                 # the client goes away mid-stream
    wait_until(lambda: rid in cancelled, "request was not cancelled")
    assert loop.call(lambda e: rid not in e.requests and e.num_unfinished == 0)     # forgotten, too
    assert loop.call(lambda e: all(a.blocks.num_free == a.blocks.capacity for a in e.aws))


def test_a_client_that_leaves_before_the_answer_cancels_its_request(served, monkeypatch):
    """Non-streaming: nothing is written until the end, so the server watches the socket."""
    _, _, url, loop = served
    cancelled = _cancels(loop, monkeypatch)
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"prompt_ids": [9, 8, 7], "max_new_tokens": 240}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.05)                                         # sent; then the client is gone
    wait_until(lambda: bool(cancelled), "request was not cancelled")
    assert loop.call(lambda e: e.num_unfinished == 0)
    assert loop.call(lambda e: all(a.blocks.num_free == a.blocks.capacity for a in e.aws))


def _extra_server(loop, **kw):
    from tarragon_jax.serving.server import Server
    server = Server(loop, port=0, **kw).start()
    return server, server.url


def test_past_the_limit_a_request_gets_429_and_nothing_else_changes(served):
    cfg, params, _, loop = served
    server, url = _extra_server(loop, max_unfinished=1)
    first = {}
    t = threading.Thread(target=lambda: first.update(r=request(url + "/generate",
                                                               {"prompt_ids": [4, 5], "max_new_tokens": 120})))
    t.start()
    wait_until(lambda: loop.call(lambda e: e.num_unfinished) == 1, "first request never started")
    code, text = request(url + "/v1/completions", {"prompt": [6, 7], "max_tokens": 4})
    assert code == 429 and "overloaded" in json.loads(text)["error"]["message"]
    code, text = request(url + "/generate", {"prompt_ids": [6, 99999], "max_new_tokens": 4})
    assert code == 400 and "out of range" in json.loads(text)["error"]["message"]           # never servable: not 429
    t.join()
    assert first["r"][0] == 200 and json.loads(first["r"][1])["output_ids"] == \
        reference.greedy_generate(cfg, params, [4, 5], 120)
    assert request(url + "/generate", {"prompt_ids": [6, 7], "max_new_tokens": 4})[0] == 200   # room again
    server.shutdown()


def test_draining_refuses_new_requests_and_finishes_the_running_ones(served):
    cfg, params, _, loop = served
    server, url = _extra_server(loop)
    first = {}
    t = threading.Thread(target=lambda: first.update(r=request(url + "/generate",
                                                               {"prompt_ids": [9, 3], "max_new_tokens": 120})))
    t.start()
    wait_until(lambda: loop.call(lambda e: e.num_unfinished) == 1, "first request never started")
    drained = {}
    d = threading.Thread(target=lambda: drained.update(ok=server.drain(60)))
    d.start()
    wait_until(lambda: server.draining, "drain never started")
    code, text = request(url + "/generate", {"prompt_ids": [1, 2], "max_new_tokens": 4})
    assert code == 503 and "draining" in json.loads(text)["error"]["message"]
    code, text = request(url + "/health")
    assert code == 503 and json.loads(text)["draining"] is True
    t.join()
    d.join()
    assert drained["ok"] and first["r"][0] == 200
    assert json.loads(first["r"][1])["output_ids"] == reference.greedy_generate(cfg, params, [9, 3], 120)
    server.shutdown()


def test_sigterm_drains_the_launcher():
    """launch/serve.py on SIGTERM: the request in flight completes, then the process exits 0."""
    proc, url = launch_server()
    try:
        assert request(url + "/generate", {"prompt_ids": [1, 2], "max_new_tokens": 2})[0] == 200   # warm
        got = {}
        t = threading.Thread(target=lambda: got.update(r=request(url + "/generate",
                                                                 {"prompt_ids": [1, 2, 3], "max_new_tokens": 150})))
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join()
        assert got["r"][0] == 200 and len(json.loads(got["r"][1])["output_ids"]) == 150
        assert proc.wait(timeout=60) == 0
        assert "drained: every request finished" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_prefix_cache_counters_and_reset(served):
    """A prompt sent twice is served from the prefix cache the second time (the /metrics counters
    say so: its 9 full pages of 4 tokens) with the same tokens; after POST /reset_prefix_cache it
    is computed again."""
    cfg, params, url, _ = served
    prompt = fresh_rng().integers(3, cfg.vocab_size, 40).tolist()

    def hits():
        with urllib.request.urlopen(url + "/metrics") as r:
            text = r.read().decode()
        return float(next(x.split()[-1] for x in text.splitlines() if x.startswith("tarragon_prefix_cache_hit_tokens_total")))
    want = reference.greedy_generate(cfg, params, prompt, 4)
    outs, before = [], hits()
    for reset in (False, False, True):
        if reset:
            code, body = request(url + "/reset_prefix_cache", {})
            assert code == 200 and json.loads(body)["blocks_dropped"] > 0
        code, body = request(url + "/generate", {"prompt_ids": prompt, "max_new_tokens": 4})
        assert code == 200
        outs.append(json.loads(body)["output_ids"])
    assert outs == [want] * 3
    assert hits() - before == 36
