"""The server as users of the field meet it: the official `openai` client against a real uvicorn
server on a free port. Chat completions follow the checkpoint's chat template and equal the
reference's greedy text; 64 streaming chat clients see identical texts while an EW and an AW are
killed mid-run; /metrics parses with prometheus_client's parser; the admission limit is the KV
pages; /fail's check and kill are one step; a stuck engine loop makes /health answer 503."""
import asyncio
import json
import os
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from serving import serving, wait_until
from tarragon_jax.config import SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.serving.chat_template import ChatTemplate
from tarragon_jax.serving.openai_tools import ToolChoice, calls
from seeding import fresh_rng
from tests.fault_workload import SCHEMA, follows_schema

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "chat_tiny")
WORDS = ["alpha", "beta", "gamma", "delta", "kiwi", "mango", "pear", "plum", "über", "naïve", "東京"]


# ChatML with the tools listed in a system turn and calls as Hermes <tool_call> blocks (Qwen's layout)
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n<tools>' }}{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
    "'\\n' + message['content'] }}{% for c in message.get('tool_calls') or [] %}{{ '<tool_call>' + "
    "c['function'] | tojson + '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def _weather_args(arguments: str) -> bool:
    a = json.loads(arguments)
    return set(a) == {"city", "days"} and isinstance(a["city"], str) and len(a["city"]) <= 10 and 1 <= a["days"] <= 7


@pytest.fixture(scope="module")
def chat():
    tok, template = Tokenizer.from_file(os.path.join(FIXTURE, "tokenizer.json")), ChatTemplate.from_checkpoint(FIXTURE)
    eos = tok.token_to_id("<|im_end|>")
    kw = dict(tokenizer=tok, chat_template=template, model_name="tiny-chat", eos_ids=(eos,), allow_faults=True)
    tools = dict(kw, chat_template=ChatTemplate(TOOLS_TEMPLATE, template.special_tokens), allow_faults=False)
    with serving("qwen3_moe", 3, main=kw, bare=dict(model_name="tiny-chat"), tools=tools, vocab=(tok, (eos,)),
                 cache=dict(page_size=16, num_pages=256)) as (cfg, params, loop, servers):
        yield cfg, params, tok, template, eos, loop, servers


def _client(url: str, cls=openai.OpenAI):
    return cls(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _messages(rng) -> list:
    words = " ".join(rng.choice(WORDS, rng.integers(2, 6)))
    return [{"role": "user", "content": f"Say {words}."}]


def _expected(cfg, params, tok, template, eos, messages, n, sampling=None) -> tuple[str, str]:
    """(text, finish_reason) of the dense reference on the rendered prompt, cut at EOS."""
    ids = tok.encode(template.render(messages), add_special_tokens=False).ids
    out = reference.greedy_generate(cfg, params, ids, n, sampling)
    if eos in out:
        return tok.decode(out[:out.index(eos)]), "stop"
    return tok.decode(out), "length"


def test_chat_completion_is_the_reference_text(chat):
    cfg, params, tok, template, eos, _, servers = chat
    client = _client(servers["main"][1])
    messages = _messages(fresh_rng())
    want, reason = _expected(cfg, params, tok, template, eos, messages, 12)
    out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    assert out.choices[0].finish_reason == reason
    n_prompt = len(tok.encode(template.render(messages), add_special_tokens=False).ids)
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_completion_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_penalties_and_logit_bias_through_the_official_client(chat):
    cfg, params, tok, template, eos, _, servers = chat
    messages = _messages(fresh_rng())
    favoured = tok.token_to_id("mango") or tok.encode("mango", add_special_tokens=False).ids[0]
    sp = SamplingParams(max_new_tokens=10, presence_penalty=0.6, frequency_penalty=1.1, logit_bias=((favoured, 6.0),))
    want, _ = _expected(cfg, params, tok, template, eos, messages, 10, sp)
    out = _client(servers["main"][1]).chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=10, temperature=0, presence_penalty=0.6,
        frequency_penalty=1.1, logit_bias={str(favoured): 6.0})
    assert out.choices[0].message.content == want


def test_json_schema_answers_through_the_official_client(chat):
    """response_format json_schema, sampled, n=4: every choice is JSON following the schema and
    ends with EOS ("stop"); a schema llguidance cannot use is a 400 naming it."""
    _, _, _, _, _, _, servers = chat
    client = _client(servers["main"][1])
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
    out = client.chat.completions.create(model="tiny-chat", messages=_messages(fresh_rng()), max_tokens=128,
                                         temperature=1.0, seed=7, n=4, response_format=fmt)
    assert [c.finish_reason for c in out.choices] == ["stop"] * 4
    assert all(follows_schema(c.message.content) for c in out.choices), [c.message.content for c in out.choices]
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError, match="JSON schema not usable"):
        client.chat.completions.create(model="tiny-chat", messages=_messages(fresh_rng()), response_format=bad)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_through_the_official_client(chat, stream):
    """tool_choice naming a function: one call to it, its arguments following its parameters'
    schema (streamed as they come), finish "stop"; "required": one or more calls to the tools,
    each one's arguments its schema's, finish "tool_calls"; the tools reach the model through the
    template (a longer prompt); an assistant message holding tool calls and a tool message go
    back in."""
    _, _, tok, _, _, _, servers = chat
    client = _client(servers["tools"][1])
    messages = _messages(fresh_rng())

    def ask(**kw):
        if not stream:
            out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=160,
                                                 temperature=1.0, seed=3, tools=[WEATHER, TIME], **kw)
            c = out.choices[0]
            return c.message.content, [t.model_dump() for t in c.message.tool_calls or []], c.finish_reason, out.usage
        calls, content, reason, deltas = {}, "", None, 0
        for ch in client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=160, temperature=1.0,
                                                 seed=3, tools=[WEATHER, TIME], stream=True, **kw):
            d = ch.choices[0].delta
            content += d.content or ""
            for t in d.tool_calls or []:              # deltas of a call by index, as the client merges them
                deltas += 1
                call = calls.setdefault(t.index, {"id": t.id, "type": t.type, "function": {"name": "", "arguments": ""}})
                call["function"]["name"] += t.function.name or ""
                call["function"]["arguments"] += t.function.arguments or ""
            reason = ch.choices[0].finish_reason or reason
        if kw["tool_choice"] != "required":
            assert deltas > 2                          # a named call's arguments stream as they come
        return content or None, [calls[i] for i in sorted(calls)], reason, None
    content, calls, reason, usage = ask(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert content is None and reason == "stop" and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather" and _weather_args(calls[0]["function"]["arguments"])
    content, calls, reason, _ = ask(tool_choice="required")
    assert content is None and reason == "tool_calls" and calls
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        assert _weather_args(c["function"]["arguments"]) if c["function"]["name"] == "get_weather" else \
            args in ({"zone": "UTC"}, {"zone": "CET"})
    if not stream:
        plain = _client(servers["tools"][1]).chat.completions.create(model="tiny-chat", messages=messages, max_tokens=1)
        assert usage.prompt_tokens > plain.usage.prompt_tokens + 20            # the tools are in the prompt
        back = messages + [{"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}]
        out = client.chat.completions.create(model="tiny-chat", messages=back, max_tokens=4, tools=[WEATHER, TIME])
        assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tokenize_renders_chat_messages_as_the_chat_api_does(chat):
    _, _, tok, template, _, _, servers = chat
    messages = _messages(fresh_rng())
    r = httpx.post(servers["main"][1] + "/tokenize", json={"messages": messages})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(template.render(messages),
                                                                      add_special_tokens=False).ids
    out = _client(servers["main"][1]).chat.completions.create(model="tiny-chat", messages=messages, max_tokens=1)
    assert out.usage.prompt_tokens == r.json()["count"]


def test_auto_tool_choice_parses_hermes_blocks():
    """"auto": the model's <tool_call> blocks become calls and the rest stays content; text with
    no block, or a malformed one, is plain content."""
    auto = ToolChoice("auto")
    text = 'Let me check. <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    content, found = calls(auto, text)
    assert content == "Let me check." and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                          for c in found] == [("get_time", {"zone": "UTC"})]
    assert calls(auto, "no call here") == ("no call here", None)
    assert calls(auto, "<tool_call>{oops}</tool_call>") == ("<tool_call>{oops}</tool_call>", None)


def _unspecial(tok: Tokenizer, text: str) -> str:
    """`text` without the special tokens a random model may emit mid-answer: the content skips them
    (as transformers' `skip_special_tokens` does), a logprobs entry names the token it scores."""
    for t in tok.get_added_tokens_decoder().values():
        if t.special:
            text = text.replace(t.content, "")
    return text


def test_chat_logprobs_through_the_official_client(chat):
    """logprobs=true with top_logprobs: one entry per token of the answer (the EOS token that ends
    it has none), whose bytes make up the content (a token's own text cannot hold half of a
    character: byte-level BPE splits some; a random model may also emit bytes that are no UTF-8,
    shown as U+FFFD in the text), alternatives best first."""
    cfg, params, tok, template, eos, _, servers = chat
    client = _client(servers["main"][1])
    messages = _messages(fresh_rng())
    want, _ = _expected(cfg, params, tok, template, eos, messages, 10)
    out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    joined = b"".join(bytes(c.bytes) for c in content).decode(errors="replace")    # a random model's bytes
    assert out.choices[0].message.content == want
    assert _unspecial(tok, joined).replace("\ufffd", "") == want.replace("\ufffd", "")
    if not any("\ufffd" in c.token for c in content):
        assert _unspecial(tok, "".join(c.token for c in content)) == want
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.logprob == c.top_logprobs[0].logprob and c.token == c.top_logprobs[0].token     # greedy
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.top_logprobs) for e in streamed] == [(c.token, c.logprob, []) for c in content]
    plain = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match='"top_logprobs" needs "logprobs": true'):
        client.chat.completions.create(model="tiny-chat", messages=messages, top_logprobs=2)


def test_chat_text_parts_stop_strings_and_template_errors(chat):
    cfg, params, tok, template, eos, _, servers = chat
    client = _client(servers["main"][1])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    want, _ = _expected(cfg, params, tok, template, eos, messages, 16)
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                       {"type": "text", "text": "fruit."}]}]
    out = client.chat.completions.create(model="tiny-chat", messages=parts, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == want
    if len(want) >= 4:                                   # a stop string inside the answer ends it there
        stop = want[2:4]
        out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0,
                                             stop=[stop])
        assert out.choices[0].message.content == want[:want.find(stop)] and out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="unknown role: robot"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        _client(servers["bare"][1]).chat.completions.create(model="tiny-chat", messages=messages)
    with pytest.raises(openai.BadRequestError, match=r"names 'g', which is not one of the \"tools\" \['f'\]"):
        client.chat.completions.create(model="tiny-chat", messages=messages, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}],
            tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="tiny-chat", input="x")
    assert e.value.body["message"] == "no such endpoint: POST /v1/embeddings"


def test_64_streaming_chat_clients_through_an_ew_and_an_aw_failure(chat):
    """Each client's texts with two workers killed mid-run equal its texts in a failure-free run
    on the same server (greedy for half of them, seeded sampling of n=2 choices for the rest)."""
    cfg, params, tok, template, eos, loop, servers = chat
    url = servers["main"][1]
    rng = fresh_rng()
    jobs = [(_messages(rng), 0.0 if i % 2 else 0.8, int(rng.integers(1 << 30))) for i in range(64)]
    streamed = [0]

    async def one(client, messages, temperature, seed):
        n = 2 if temperature else 1
        stream = await client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16,
                                                      temperature=temperature, seed=seed, stream=True, n=n)
        texts, reasons = [""] * n, [None] * n
        async for c in stream:
            streamed[0] += 1
            i = c.choices[0].index
            texts[i] += c.choices[0].delta.content or ""
            reasons[i] = c.choices[0].finish_reason or reasons[i]
        return texts, reasons

    async def run(kill: bool):
        client = _client(url, openai.AsyncOpenAI)
        tasks = [asyncio.create_task(one(client, *job)) for job in jobs]
        if kill:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                for worker, after in (("ew1", 64), ("aw0", 192)):
                    while streamed[0] < after:
                        await asyncio.sleep(0.005)
                    r = await http.post("/fail", json={"worker": worker})
                    assert r.status_code == 200, r.text
        return await asyncio.gather(*tasks)

    clean = asyncio.run(run(kill=False))
    streamed[0] = 0
    faulty = asyncio.run(run(kill=True))
    assert faulty == clean
    assert all(reason in ("stop", "length") for _, reasons in faulty for reason in reasons)
    assert any(len(set(texts)) == 2 for texts, _ in faulty)                  # choices differ
    kinds = loop.call(lambda e: sorted(r.kind for r in e.controller.records))
    assert kinds == ["aw", "ew"]
    assert loop.call(lambda e: e.controller.records[-1].requests_moved) > 0      # the AW held requests


def test_metrics_parse_and_count_what_happened(chat):
    _, _, _, _, _, loop, servers = chat
    url = servers["main"][1]
    client = _client(url)
    for i in range(3):
        client.completions.create(model="tiny-chat", prompt=[5, 6, 7 + i], max_tokens=5, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("tarragon_worker_up", "tarragon_recoveries", "tarragon_recovery_stall_seconds", "tarragon_ert_version",
                 "tarragon_requests_running", "tarragon_requests_waiting", "tarragon_time_to_first_token_seconds",
                 "tarragon_inter_token_latency_seconds", "tarragon_generation_tokens", "tarragon_kv_pages_used",
                 "tarragon_expert_rows", "tarragon_expert_layer_rows", "tarragon_expert_load"):
        assert name in families, name
    value = lambda fam, sample, **labels: next(s.value for s in families[fam].samples
                                               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))
    assert value("tarragon_generation_tokens", "tarragon_generation_tokens_total") >= 15
    assert value("tarragon_time_to_first_token_seconds", "tarragon_time_to_first_token_seconds_count") >= 3
    assert value("tarragon_requests_running", "tarragon_requests_running") == 0
    ews = [s for s in families["tarragon_expert_rows"].samples if s.name == "tarragon_expert_rows_total"]
    assert len(ews) == 3 and all(s.value > 0 for s in ews)                    # every EW served rows
    for ew in ews:                                                              # its layers add up to it
        assert ew.value == sum(s.value for s in families["tarragon_expert_layer_rows"].samples
                               if s.name == "tarragon_expert_layer_rows_total" and s.labels["worker"] == ew.labels["worker"])
    n_layers = loop.call(lambda e: e.controller.model.n_moe_layers)
    for layer in map(str, range(n_layers)):                                     # each layer's expert shares sum to 1
        shares = [s.value for s in families["tarragon_expert_load"].samples if s.labels["layer"] == layer]
        assert len(shares) == loop.call(lambda e: e.controller.model.n_experts) and abs(sum(shares) - 1) < 1e-9
    ups = {s.labels["worker"]: s.value for s in families["tarragon_worker_up"].samples}
    failed = loop.call(lambda e: sorted(e.controller.health.failed))
    assert {w for w, up in ups.items() if up == 0} == set(failed)
    records = loop.call(lambda e: len(e.controller.records))
    assert sum(s.value for s in families["tarragon_recoveries"].samples if s.name == "tarragon_recoveries_total") \
        == records
    assert value("tarragon_recovery_stall_seconds", "tarragon_recovery_stall_seconds_count") == records
    assert value("tarragon_ert_version", "tarragon_ert_version") == loop.call(lambda e: e.controller.ert.version)


def test_fail_checks_and_kills_in_one_step():
    """Two concurrent /fail calls for the two AWs: one is killed, the other refused (the last live AW)."""
    with serving("qwen3_moe", 4, main=dict(allow_faults=True)) as (_, _, loop, servers):
        url, barrier, codes = servers["main"][1], threading.Barrier(2), {}

        def kill(worker):
            barrier.wait()
            codes[worker] = httpx.post(url + "/fail", json={"worker": worker}, timeout=60).status_code
        threads = [threading.Thread(target=kill, args=(w,)) for w in ("aw0", "aw1")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes.values()) == [200, 400]
        killed = loop.call(lambda e: [ev.worker for ev in e.controller.health.events if ev.kind == "killed"])
        assert len(killed) == 1 and killed[0] in ("aw0", "aw1")       # (a replacement may have joined since)


def test_admission_limit_defaults_to_the_kv_pages():
    with serving("qwen3_moe", 4, main={}, cache=dict(page_size=4, num_pages=6)) as (_, _, loop, servers):
        server, url = servers["main"]
        limit = loop.call(lambda e: sum(a.blocks.capacity for a in e.aws))     # 2 x (6 - the sink page)
        assert server.max_unfinished == limit == 10
        client = _client(url, openai.AsyncOpenAI)

        async def flood():
            hold = [asyncio.create_task(client.completions.create(model="tarragon", prompt=[4, 5], max_tokens=18,
                                                                  temperature=0)) for _ in range(limit)]
            while loop.call(lambda e: e.num_unfinished) < limit:
                await asyncio.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="overloaded"):
                await client.completions.create(model="tarragon", prompt=[4, 5], max_tokens=2)
            return await asyncio.gather(*hold)
        done = asyncio.run(flood())
        assert len({d.choices[0].text for d in done}) == 1 and all(d.usage.completion_tokens == 18 for d in done)
        # n choices are n requests: past the limit the whole request is refused, and the choices
        # already taken in are dropped at once (none is left running)
        with pytest.raises(openai.RateLimitError, match="overloaded"):
            _client(url).completions.create(model="tarragon", prompt=[4, 5], max_tokens=18, n=limit + 1)
        wait_until(lambda: loop.call(lambda e: e.num_unfinished) == 0, "refused choices still running")


def test_health_is_503_while_the_engine_loop_is_stuck():
    from tarragon_jax.serving.server import HttpLimits
    with serving("qwen3_moe", 4, main=dict(limits=HttpLimits(health_timeout_s=0.5))) as (_, _, loop, servers):
        url = servers["main"][1]
        assert httpx.get(url + "/health").status_code == 200
        step, stuck = loop.engine.step, threading.Event()

        def slow_step():
            if not stuck.is_set():
                stuck.set()
                time.sleep(3.0)                   # a step that does not come back (for a while)
            return step()
        loop.engine.step = slow_step
        got = {}
        t = threading.Thread(target=lambda: got.update(r=_client(url).completions.create(
            model="tarragon", prompt=[1, 2], max_tokens=3)))
        t.start()
        stuck.wait(30)
        t0 = time.monotonic()
        r = httpx.get(url + "/health", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "stuck" and time.monotonic() - t0 < 2.0
        t.join()
        assert got["r"].usage.completion_tokens == 3                   # the stuck step came back
        assert httpx.get(url + "/health").status_code == 200


def test_api_key_is_required_where_set():
    """--api_key as vLLM's --api-key: the official client with the key gets its completion; without
    it, or with a wrong one, 401 and an OpenAI error object (openai.AuthenticationError); /health
    and /metrics stay open to probes; /fail needs the key too. A server without a key is open."""
    key = "sk-" + os.urandom(8).hex()
    with serving("qwen3_moe", 5, keyed=dict(api_key=key, allow_faults=True), open=dict()) as (_, _, _, servers):
        keyed, open_ = servers["keyed"][1], servers["open"][1]
        prompt = dict(model="tarragon", prompt=[3, 4, 5], max_tokens=3, temperature=0.0)
        good = openai.OpenAI(base_url=keyed + "/v1", api_key=key, max_retries=0, timeout=120)
        answer = good.completions.create(**prompt)
        assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"
        assert good.models.list().data[0].id == "tarragon"
        for wrong in ("unused", key + "x", key[:-1]):
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=keyed + "/v1", api_key=wrong, max_retries=0).completions.create(**prompt)
            assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        assert httpx.get(keyed + "/health", timeout=60).status_code == 200
        assert httpx.get(keyed + "/metrics", timeout=60).status_code == 200
        assert httpx.post(keyed + "/fail", json={"worker": "ew0"}, timeout=60).status_code == 401
        assert httpx.post(keyed + "/generate", json={"prompt_ids": [3, 4]}, timeout=60,
                          headers={"Authorization": "Basic " + key}).status_code == 401
        assert _client(open_).completions.create(**prompt).choices[0].finish_reason in ("length", "stop")
