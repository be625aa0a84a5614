"""The OpenAI completions API as a client sees it: text equals the reference's greedy tokens
decoded, streaming (SSE) deltas add up to the same text, stop strings and EOS ids end the
completion where OpenAI would, penalties and logit bias act as vLLM's, unsupported fields get a
400 naming them."""
import json

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from serving import request, serving
from tarragon_jax.config import SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.serving.openai_api import TextStream
from seeding import fresh_rng


def char_tokenizer(vocab_size):
    """One character per token id: texts follow directly from token ids."""
    tok = Tokenizer(models.WordLevel({chr(0x100 + i): i for i in range(vocab_size)}, unk_token=chr(0x100)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


@pytest.fixture(scope="module")
def api():
    tok = char_tokenizer(512)                       # the tiny model's vocabulary
    with serving("qwen2_moe", 5, text=dict(tokenizer=tok, model_name="tiny-moe"),
                 ids=dict(model_name="tiny-moe")) as (cfg, params, loop, servers):
        assert cfg.vocab_size == 512
        yield cfg, params, tok, {k: url for k, (_, url) in servers.items()}, loop, servers["text"][0]


def _prompt_and_reference(cfg, params, tok, n_new):
    ids = fresh_rng().integers(3, cfg.vocab_size, 7).tolist()
    want = reference.greedy_generate(cfg, params, ids, n_new)
    return tok.decode(ids), want


def _sse(body: str) -> list:
    events = [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_is_the_reference_text(api):
    cfg, params, tok, urls, _, _ = api
    prompt, want = _prompt_and_reference(cfg, params, tok, 8)
    code, body = request(urls["text"] + "/v1/completions",
                          {"model": "tiny-moe", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert code == 200, body
    out = json.loads(body)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny-moe"
    assert out["choices"][0]["text"] == tok.decode(want)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}
    # token-id prompts need no tokenizer; the answer's text is then empty
    ids = [ord(c) - 0x100 for c in prompt]
    code, body = request(urls["ids"] + "/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0})
    assert code == 200 and json.loads(body)["usage"]["completion_tokens"] == 8
    models = json.loads(request(urls["text"] + "/v1/models")[1])
    assert [m["id"] for m in models["data"]] == ["tiny-moe"]


def test_streamed_deltas_add_up_to_the_text(api):
    cfg, params, tok, urls, _, _ = api
    prompt, want = _prompt_and_reference(cfg, params, tok, 10)
    code, body = request(urls["text"] + "/v1/completions",
                          {"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
    assert code == 200
    chunks = _sse(body)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == tok.decode(want)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_completion_before_it(api, stream):
    cfg, params, tok, urls, loop, _ = api
    prompt, want = _prompt_and_reference(cfg, params, tok, 12)
    full = tok.decode(want)
    stop = full[4:6]
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": ["never seen", stop], "stream": stream}
    code, text = request(urls["text"] + "/v1/completions", body)
    assert code == 200, text
    if stream:
        chunks = _sse(text)
        got, reason = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
    else:
        got, reason = json.loads(text)["choices"][0]["text"], json.loads(text)["choices"][0]["finish_reason"]
    assert got == full[:full.find(stop)] and reason == "stop"
    assert loop.call(lambda e: e.num_unfinished) == 0          # cancelled in the engine, not run to max


def test_eos_id_ends_the_completion_without_its_text(api):
    cfg, params, tok, _, _, text_server = api
    prompt, want = _prompt_and_reference(cfg, params, tok, 8)
    text_server.eos_ids = (want[3],)
    try:
        code, body = request(f"http://127.0.0.1:{text_server.server_address[1]}/v1/completions",
                              {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    finally:
        text_server.eos_ids = ()
    out = json.loads(body)
    first = want.index(want[3])
    assert out["choices"][0] == {"index": 0, "text": tok.decode(want[:first]), "finish_reason": "stop",
                                 "logprobs": None}
    assert out["usage"]["completion_tokens"] == first + 1


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_are_the_references(api, stream):
    """OpenAI's completions logprobs object: each token's text (one character per token here),
    its offset in the text, its logprob and the 3 most likely alternatives', equal to the dense
    reference's log-softmax; a stream's chunks carry their own tokens'."""
    import jax
    cfg, params, tok, urls, _, _ = api
    ids = fresh_rng().integers(3, cfg.vocab_size, 7).tolist()
    want = reference.greedy_generate(cfg, params, ids, 6)
    code, body = request(urls["text"] + "/v1/completions", {"prompt": tok.decode(ids), "max_tokens": 6,
                                                           "temperature": 0, "logprobs": 3, "stream": stream})
    assert code == 200, body
    if stream:
        parts = [c["choices"][0]["logprobs"] for c in _sse(body) if c["choices"]]
        lp = {k: sum((p[k] for p in parts), []) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        lp = json.loads(body)["choices"][0]["logprobs"]
    ref = np.asarray(jax.nn.log_softmax(reference.forward(cfg, params, np.asarray(ids + want, np.int32))[6:-1], -1))
    assert lp["tokens"] == [tok.decode([t]) for t in want] and lp["text_offset"] == list(range(6))
    np.testing.assert_allclose(lp["token_logprobs"], [ref[i, t] for i, t in enumerate(want)], atol=1e-5)
    for i, top in enumerate(lp["top_logprobs"]):
        best = np.argsort(-ref[i])[:3]
        assert list(top) == [tok.decode([int(j)]) for j in best]
        np.testing.assert_allclose(list(top.values()), ref[i][best], atol=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_scores_the_prompt_as_the_reference(api, stream):
    """echo with logprobs, as lm-evaluation-harness scores a text: the prompt comes back with
    each token's logprob given those before it (the first: null); max_tokens 0 scores the prompt
    alone; with max_tokens 3 the completion follows, offsets running on."""
    import jax
    cfg, params, tok, urls, _, _ = api
    ids = fresh_rng().integers(3, cfg.vocab_size, 9).tolist()
    ref = np.asarray(jax.nn.log_softmax(reference.forward(cfg, params, np.asarray(ids, np.int32)), -1))
    for max_tokens in (0, 3):
        code, body = request(urls["text"] + "/v1/completions", {
            "prompt": tok.decode(ids), "max_tokens": max_tokens, "echo": True, "logprobs": 2, "temperature": 0,
            "stream": stream})
        assert code == 200, body
        if stream:
            chunks = [c for c in _sse(body) if c["choices"]]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            lp = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks), [])
                  for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        else:
            out = json.loads(body)
            text, lp = out["choices"][0]["text"], out["choices"][0]["logprobs"]
            assert out["usage"]["completion_tokens"] == max_tokens
        want = reference.greedy_generate(cfg, params, ids, max_tokens) if max_tokens else []
        assert text == tok.decode(ids + want)
        assert lp["tokens"] == [tok.decode([t]) for t in ids + want] and lp["text_offset"] == list(range(9 + max_tokens))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:9], [ref[k, ids[k + 1]] for k in range(8)], atol=1e-5)
        for k, top in enumerate(lp["top_logprobs"][1:9]):       # the 2 best, then the prompt's own if not among them
            best = [tok.decode([int(j)]) for j in np.argsort(-ref[k])[:2]]
            assert list(top) == best + ([] if tok.decode([ids[k + 1]]) in best else [tok.decode([ids[k + 1]])])


def test_penalties_and_logit_bias_are_the_references(api):
    """A greedy completion with every penalty and a bias equals the dense reference with vLLM's
    processor; a ban of the reference's first token changes the first token."""
    cfg, params, tok, urls, _, _ = api
    ids = fresh_rng().integers(3, cfg.vocab_size, 7).tolist()
    ask = {"presence_penalty": 0.5, "frequency_penalty": 1.2, "repetition_penalty": 1.4,
           "logit_bias": {str(ids[0]): 3.5, str(ids[1]): -2.0}}
    sp = SamplingParams(max_new_tokens=8, presence_penalty=0.5, frequency_penalty=1.2, repetition_penalty=1.4,
                        logit_bias=((ids[0], 3.5), (ids[1], -2.0)))
    code, body = request(urls["text"] + "/v1/completions",
                         {"prompt": tok.decode(ids), "max_tokens": 8, "temperature": 0, **ask})
    assert code == 200 and json.loads(body)["choices"][0]["text"] == tok.decode(reference.greedy_generate(cfg, params, ids, 8, sp))
    plain = reference.greedy_generate(cfg, params, ids, 1)[0]
    code, body = request(urls["text"] + "/v1/completions", {"prompt": tok.decode(ids), "max_tokens": 1,
                                                            "temperature": 0, "logit_bias": {str(plain): -100}})
    assert code == 200 and json.loads(body)["choices"][0]["text"] != tok.decode([plain])


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_are_seeded_samples_sharing_the_prompt(api, stream):
    """n=3 sampled: choice i is the request with seed + i (each equals a request of its own with
    that seed), later choices take the prompt's full blocks from the prefix cache, usage counts
    the prompt once; streamed, every choice's deltas add up to its text."""
    cfg, params, tok, urls, loop, _ = api
    ids = fresh_rng().integers(3, cfg.vocab_size, 37).tolist()    # 9 full blocks of 4 before the last token
    body = {"prompt": tok.decode(ids), "max_tokens": 6, "temperature": 0.9, "seed": 40}
    singles = [json.loads(request(urls["text"] + "/v1/completions", dict(body, seed=40 + i))[1])["choices"][0]["text"]
               for i in range(3)]
    loop.call(lambda engine: engine.reset_prefix_cache())
    hits = lambda: loop.call(lambda engine: sum(aw.prefix_stats.hit_tokens for aw in engine.aws))
    before = hits()
    code, text = request(urls["text"] + "/v1/completions", dict(body, n=3, stream=stream,
                                                                stream_options={"include_usage": True} if stream else None))
    assert code == 200, text
    if stream:
        chunks = _sse(text)
        texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
                 for i in range(3)]
        ends = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        usage = chunks[-1]["usage"]
        assert len(ends) == 3 and chunks[-1]["choices"] == []
    else:
        out = json.loads(text)
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        texts, usage = [c["text"] for c in out["choices"]], out["usage"]
    assert texts == singles and len(set(texts)) > 1
    assert usage == {"prompt_tokens": 37, "completion_tokens": 18, "total_tokens": 55}
    # with 2 AWs the router may balance choice 1 onto the idle one (which computes the prompt, or
    # reads what the store has of it); choice 2 then reads all 9 blocks on either AW
    assert 36 <= hits() - before <= 72


@pytest.mark.parametrize("body,message", [
    ({"prompt": "x", "n": 0}, '"n" must be an integer from 1 to 128, got 0'),
    ({"prompt": "x", "n": 2, "best_of": 3}, '"best_of"=3 is not supported (only equal to "n", 2)'),
    ({"prompt": "x", "suffix": "y"}, '"suffix"=\'y\' is not supported'),
    ({"prompt": "x", "response_format": {"type": "xml"}}, '"response_format" must be {"type": "text"}'),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "needs the checkpoint's tokenizer"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty must be a number in [-2, 2], got 3"),
    ({"prompt": "x", "frequency_penalty": "high"}, "frequency_penalty must be a number"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty must be a number in (0, 10]"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, '"logit_bias" must map token ids'),
    ({"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias must be"),
    ({"prompt": "x", "logit_bias": {"512": 1}}, "logit_bias token id 512 out of range"),
    ({"prompt": "x", "logprobs": 21}, '"logprobs" must be an integer from 0 to 20'),
    ({"prompt": "x", "logprobs": True}, '"logprobs" must be an integer from 0 to 20'),
    ({"prompt": "x", "echo": 1}, '"echo" must be true or false'),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be"),
    ({"prompt": "x", "model": "gpt-4"}, "not served here"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be"),
    ({"prompt": ["a", "b"]}, "one prompt per request"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    ({"prompt": "x", "best_effort": True}, "unknown field"),
    ({"prompt": "x", "temperature": -1}, "temperature must be"),
])
def test_bad_requests_name_the_field(api, body, message):
    code, text = request(api[3]["text"] + "/v1/completions", body)
    assert code == 400 and message in json.loads(text)["error"]["message"], text


def test_tokenizer_endpoints_as_vllm_serves_them(api):
    """/tokenize (text, or chat messages through the template), /detokenize and /tokenizer_info
    agree with the tokenizer; a server without one, or bad ids, get a 400 naming it."""
    cfg, _, tok, urls, _, _ = api
    text = tok.decode(fresh_rng().integers(3, cfg.vocab_size, 9).tolist())
    code, body = request(urls["text"] + "/tokenize", {"prompt": text, "add_special_tokens": False})
    ids = tok.encode(text, add_special_tokens=False).ids
    assert code == 200 and json.loads(body) == {"tokens": ids, "count": len(ids), "max_model_len": cfg.max_position}
    code, body = request(urls["text"] + "/detokenize", {"tokens": ids})
    assert code == 200 and json.loads(body) == {"prompt": text}
    info = json.loads(request(urls["text"] + "/tokenizer_info")[1])
    assert info["model_max_length"] == cfg.max_position and "eos_token" in info
    assert "no tokenizer" in request(urls["ids"] + "/tokenize", {"prompt": "x"})[1]
    code, body = request(urls["text"] + "/detokenize", {"tokens": [cfg.vocab_size]})
    assert code == 400 and "token ids in [0, 512)" in body
    assert "exactly one of" in request(urls["text"] + "/tokenize", {})[1]


def test_null_fields_mean_their_defaults(api):
    cfg, params, tok, urls, _, _ = api
    prompt, want = _prompt_and_reference(cfg, params, tok, 16)
    body = {"prompt": prompt, "temperature": 0, "max_tokens": None, "seed": None, "top_p": None, "stop": None,
            "logprobs": None, "n": None, "stream": None, "suffix": None, "user": None}
    code, text = request(urls["text"] + "/v1/completions", body)
    assert code == 200 and json.loads(text)["choices"][0]["text"] == tok.decode(want)   # max_tokens 16


def test_text_and_stop_strings_need_a_tokenizer(api):
    url = api[3]["ids"] + "/v1/completions"
    assert "needs a tokenizer" in request(url, {"prompt": "hello"})[1]
    assert "need a tokenizer" in request(url, {"prompt": [5, 6], "stop": "a"})[1]


class _Chars:
    """A stand-in tokenizer: token i is the i-th string of a table (decode concatenates)."""
    def __init__(self, table):
        self.table = table

    def decode(self, ids):
        return "".join(self.table[i] for i in ids)


def test_text_stream_holds_back_a_possible_stop_string_and_half_characters():
    s = TextStream(_Chars(["x", "a", "c", "b", "\ufffd"]), ("ab",))
    assert s.push(0) == "x"
    assert s.push(1) == ""           # "a" may begin "ab": held back
    assert s.push(2) == "ac"         # it did not
    assert s.push(4) == ""           # half a UTF-8 character: held back
    assert s.finish() == "\ufffd"
    s = TextStream(_Chars(["x", "a", "b"]), ("ab",))
    assert (s.push(0), s.push(1), s.push(2), s.stopped, s.finish()) == ("x", "", "", True, "")


def test_a_worker_killed_mid_stream_changes_no_text(api):
    """Killed after the first streamed chunk, EW 1 is masked (replay to shadows) and the text
    is the failure-free one. Last in this module: the engine runs on with a replacement."""
    import http.client
    cfg, params, tok, urls, loop, _ = api
    prompt, want = _prompt_and_reference(cfg, params, tok, 20)
    host, port = urls["text"][len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = resp.readline().decode()
    assert first.startswith("data: ")
    loop.call(lambda e: e.controller.kill("ew1"))
    rest = resp.read().decode()
    conn.close()
    chunks = _sse(first + rest)
    assert "".join(c["choices"][0]["text"] for c in chunks) == tok.decode(want)
    assert loop.call(lambda e: [r.worker for r in e.controller.records]) == ["ew1"]


def test_a_stream_that_writes_nothing_is_cancelled_when_its_client_leaves(api, monkeypatch):
    """Token-id prompts without a tokenizer stream no text: the hang-up is found by peeking."""
    import socket
    import time
    _, _, _, urls, loop, _ = api
    seen, cancel = [], loop.engine.cancel
    monkeypatch.setattr(loop.engine, "cancel", lambda rid: seen.append(cancel(rid)) or seen[-1])
    host, port = urls["ids"][len("http://"):].split(":")
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 200, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(12).split()[1] == b"200"
    sock.close()                                                   # the client goes away
    deadline = time.time() + 30
    while not seen:
        assert time.time() < deadline, "request was not cancelled"
        time.sleep(0.05)
    assert seen[0] is True                          # stopped while running, not after it finished
    assert loop.call(lambda e: e.num_unfinished) == 0


class _Bytes:
    """A byte-level stand-in tokenizer: one token per byte, decoded with replacement characters."""
    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stop,generated", [("aé", "xaé tail"), ("\n用户", "回答完毕\n用户：你好")])
def test_stop_string_split_inside_a_character_is_not_leaked(stop, generated):
    s = TextStream(_Bytes(), (stop,))
    out = "".join(s.push(b) for b in generated.encode())
    out += s.finish()
    assert out == generated[:generated.find(stop)] and s.stopped
