"""OpenAI-compatible API over the engine: `POST /v1/completions`, `POST /v1/chat/completions`,
`GET /v1/models`, and OpenAI's error object for every error.

OpenAI clients, load generators and eval harnesses speak this API; this module maps a request
onto the engine's SamplingParams and formats answers and server-sent-event chunks the way they
parse them. The server's token loop (disconnects, cancellation, engine failure) is shared with
/generate, so a worker failure mid-request is as invisible here as there.

Supported: prompt (text, with the checkpoint's tokenizer, or a list of token ids), max_tokens
(default 16), temperature (default 1), top_p, seed, stop (a string or up to 4; needs the
tokenizer), stream, stream_options.include_usage, user (ignored), and the vLLM extension
stop_token_ids, and logprobs (0-20: each token's log-probability and its n most likely
alternatives', computed on the device from the logits the token was chosen from, before
temperature; in the stream, each chunk carries its tokens'). Generation also stops at the
checkpoint's EOS ids (generation_config.json), whose token adds no text and no logprobs entry.
echo returns the prompt before the completion, and with logprobs each prompt token's (the first
has none: null), computed on the device as the prompt is (such a request takes no prefix-cache
hits); with echo, max_tokens may be 0 (the prompt scored alone, as lm-evaluation-harness asks).
presence_penalty and frequency_penalty (-2 to 2), the vLLM extension repetition_penalty, and
logit_bias (up to 300 token ids, -100 to 100) change the logits on the device before the token
is chosen; logprobs stay the model's. n (up to 128) returns that many choices, each seeded
with seed + its index (openai_choices.py), sharing the prompt's KV pages; best_of only equal to
n. suffix gets a 400 naming the field.

Chat: messages (string content, or text parts) rendered by the checkpoint's chat template
(chat_template.py), max_completion_tokens (or max_tokens), add_generation_prompt (default true),
logprobs (true/false) with top_logprobs (0-20), tools and tool_choice (openai_tools.py), and
the fields above. Both APIs take response_format: {"type": "json_object"} (any JSON object) or
{"type": "json_schema", "json_schema": {"name", "schema"}}: every token follows the JSON's
grammar (compact: no whitespace between tokens), masked on the device (workers/grammar.py); a
schema llguidance cannot use gets a 400 naming why. It needs the checkpoint's tokenizer.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

from tarragon_jax.config import MAX_LOGPROBS, ConfigError, SamplingParams
from tarragon_jax.serving import openai_tools
from tarragon_jax.serving.openai_tools import ToolChoice
from tarragon_jax.workers.grammar import json_grammar

_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
           "stop_token_ids", "n", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "logit_bias", "response_format"}
_FIELDS = {"completion": _COMMON | {"prompt", "best_of", "echo", "suffix"},
           "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                              "add_generation_prompt"}}
# field: the only value(s) accepted (what OpenAI's own defaults mean)
_FIXED = {"suffix": (None, "")}
MAX_STOP = 4
MAX_CHOICES = 128      # most choices (n) one request may ask for (OpenAI's limit)
# engine finish reason -> OpenAI's ("stop": a stop token/string; "length": a token limit)
_FINISH = {"stop": "stop", "max_new_tokens": "length", "length": "length"}


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: list
    sampling: SamplingParams
    stream: bool
    stop: tuple        # stop strings; the text ends before the first one found
    include_usage: bool
    model: str
    chat: bool = False # /v1/chat/completions: answers are chat.completion(.chunk) objects
    echo: bool = False # completions: the prompt comes back before the completion (with its logprobs)
    max_tokens: int = 16   # what the client asked: 0 with echo scores the prompt alone (one token runs, unsent)
    n: int = 1             # choices, each its own engine request (openai_choices)
    tool_choice: ToolChoice = ToolChoice("none")   # chat: what becomes tool_calls (openai_tools)

    def choice_sampling(self, i: int) -> SamplingParams:
        """Choice i's sampling: the request's, with seed + i (as vLLM seeds parallel samples)."""
        return self.sampling if i == 0 else dataclasses.replace(self.sampling, seed=(self.sampling.seed + i) % 2**32)


def _checked(body, kind: str, model_name: str) -> dict:
    """The body without nulls (clients send null for "unset"), after the checks both APIs share."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(body) - _FIELDS[kind])
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS[kind])}")
    for field, allowed in _FIXED.items():
        if field in body and body[field] not in allowed:
            raise ValueError(f'"{field}"={body[field]!r} is not supported (only {allowed[0]!r})')
    model = body.get("model", model_name)
    if model != model_name:
        raise ValueError(f'"model" {model!r} is not served here; this server serves {model_name!r}')
    return body


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives each token's logprobs list (None: no logprobs): completions ask with
    "logprobs": n; chat with "logprobs": true and "top_logprobs": n."""
    def count(field: str) -> int:
        n = body[field]
        if type(n) is not int or not 0 <= n <= MAX_LOGPROBS:
            raise ValueError(f'"{field}" must be an integer from 0 to {MAX_LOGPROBS}, got {n!r}')
        return n
    if not chat:
        return count("logprobs") if "logprobs" in body else None
    if not isinstance(body.get("logprobs", False), bool):
        raise ValueError(f'"logprobs" must be true or false, got {body["logprobs"]!r}')
    if "top_logprobs" in body and not body.get("logprobs"):
        raise ValueError('"top_logprobs" needs "logprobs": true')
    return (count("top_logprobs") if "top_logprobs" in body else 0) if body.get("logprobs") else None


def logit_bias(bias) -> tuple:
    """OpenAI's {"token id": bias} (JSON keys are strings) as SamplingParams' (id, bias) pairs."""
    if not isinstance(bias, dict) or not all(isinstance(k, str) and k.isdigit() for k in bias):
        raise ValueError('"logit_bias" must map token ids (as strings, e.g. "50256") to numbers from -100 to 100')
    return tuple((int(k), v) for k, v in bias.items())


def _grammar(body: dict) -> str | None:
    """response_format as a grammar: none for text, any JSON object for json_object, the schema's
    JSON for json_schema (workers/grammar.py)."""
    fmt = body.get("response_format", {"type": "text"})
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar({"type": "object"})
    spec = fmt.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ValueError('"response_format" must be {"type": "text"}, {"type": "json_object"} or {"type": '
                         '"json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    return json_grammar(spec.get("schema", {}))


def _choices(body: dict) -> int:
    """n, with best_of (completions) accepted only where it asks for nothing more than n."""
    n = body.get("n", 1)
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        raise ValueError(f'"n" must be an integer from 1 to {MAX_CHOICES}, got {n!r}')
    if body.get("best_of", n) != n:
        raise ValueError(f'"best_of"={body["best_of"]!r} is not supported (only equal to "n", {n})')
    return n


def _request(body: dict, prompt_ids: list, tokenizer, model_name: str, eos_ids: tuple, chat: bool,
             max_tokens: int, tool_choice: ToolChoice = ToolChoice("none"), tool_grammar: str | None = None
             ) -> CompletionRequest:
    """Sampling, stop strings, logprobs and streaming options, the same for both APIs."""
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > MAX_STOP:
        raise ValueError(f'"stop" must be a non-empty string or a list of up to {MAX_STOP} of them')
    if stop and tokenizer is None:
        raise ValueError('"stop" strings need a tokenizer (tokenizer.json in the checkpoint); use stop_token_ids')
    stop_ids = body.get("stop_token_ids", [])
    if not isinstance(stop_ids, list):
        raise ValueError('"stop_token_ids" must be a list of integers')
    if not isinstance(body.get("stream", False), bool):
        raise ValueError('"stream" must be true or false')
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ValueError('"stream_options" may only hold "include_usage"')
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ValueError('"echo" must be true or false')
    logprobs = _logprobs(body, chat)
    grammar = _grammar(body)
    if grammar is not None and tool_grammar is not None:
        raise ValueError('"response_format" and a "tool_choice" that forces a call cannot both shape the answer')
    try:
        sampling = SamplingParams(max_new_tokens=1 if echo and max_tokens == 0 else max_tokens,
                                  temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                                  seed=body.get("seed", 0), stop_token_ids=tuple(stop_ids) + tuple(eos_ids),
                                  logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
                                  presence_penalty=body.get("presence_penalty", 0.0),
                                  frequency_penalty=body.get("frequency_penalty", 0.0),
                                  repetition_penalty=body.get("repetition_penalty", 1.0),
                                  logit_bias=logit_bias(body.get("logit_bias", {})), grammar=grammar or tool_grammar)
    except ConfigError as e:
        raise ValueError(str(e).replace("max_new_tokens", "max_tokens")) from None
    return CompletionRequest(prompt_ids, sampling, body.get("stream", False), tuple(stop),
                             bool(options.get("include_usage", False)), body.get("model", model_name), chat, echo,
                             max_tokens, _choices(body), tool_choice)


def parse_completion(body, tokenizer, model_name: str, eos_ids: tuple = ()) -> CompletionRequest:
    """A /v1/completions request as the engine will run it; ValueError names the offending field."""
    body = _checked(body, "completion", model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                 # a batch of one, as some clients always send
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError('a text "prompt" needs a tokenizer (tokenizer.json in the checkpoint); '
                             "send token ids")
        prompt_ids = tokenizer.encode(prompt).ids
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        prompt_ids = list(prompt)
    else:
        raise ValueError('"prompt" must be a string or a non-empty list of token ids (one prompt per request)')
    return _request(body, prompt_ids, tokenizer, model_name, eos_ids, False, body.get("max_tokens", 16))


def _content(i: int, message) -> dict:
    """A message as templates expect it: {"role", "content": str}; text parts are joined."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f'"messages"[{i}] must be an object with a "role" string')
    content = message.get("content") or ""       # null: an assistant message of tool calls alone
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f'"messages"[{i}].content: only text parts ({{"type": "text", "text": ...}}) '
                             "are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ValueError(f'"messages"[{i}].content must be a string or a list of text parts')
    return dict(message, content=content)


def parse_chat(body, tokenizer, template, model_name: str, eos_ids: tuple = ()) -> CompletionRequest:
    """A /v1/chat/completions request: the messages rendered by the checkpoint's chat template
    (a ChatTemplate; None: NoChatTemplate-style 400) and tokenized without added special tokens,
    as transformers' apply_chat_template does; ValueError names the problem."""
    body = _checked(body, "chat", model_name)
    tools, tool_choice, tool_grammar = openai_tools.parse(body)
    prompt_ids = render_chat(body, tokenizer, template, tools)
    return _request(body, prompt_ids, tokenizer, model_name, eos_ids, True,
                    body.get("max_completion_tokens", body.get("max_tokens", 16)), tool_choice, tool_grammar)


def render_chat(body: dict, tokenizer, template, tools: list | None = None) -> list[int]:
    """The token ids of body's "messages" (and "add_generation_prompt", default true) rendered by
    the chat template with these tools; ValueError names what is wrong."""
    if template is None or tokenizer is None:
        raise ValueError("this model has no chat template (chat_template in tokenizer_config.json) or no "
                         "tokenizer: use /v1/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    add = body.get("add_generation_prompt", True)
    if not isinstance(add, bool):
        raise ValueError('"add_generation_prompt" must be true or false')
    text = template.render([_content(i, m) for i, m in enumerate(messages)], add_generation_prompt=add,
                           **({"tools": tools} if tools else {}))
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not prompt_ids:
        raise ValueError("the chat template rendered these messages as an empty prompt")
    return prompt_ids


class TextStream:
    """Incremental detokenization with stop strings: text is released only once no stop string
    can still begin inside it, and never ending in half a UTF-8 character."""

    def __init__(self, tokenizer, stop: tuple):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list = []
        self.sent = 0              # characters of the text already released
        self.stopped = False       # a stop string was found; the text ends before it

    def text(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""

    def push(self, token: int) -> str:
        """Add a token; returns the newly released text (may be empty)."""
        self.ids.append(token)
        full = self.text()
        hits = [i for i in (full.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[:min(hits)])
        body = full.rstrip("\ufffd")          # a trailing half UTF-8 character is not text yet
        hold = max((k for s in self.stop for k in range(1, len(s)) if body.endswith(s[:k])), default=0)
        return self._release(body[:len(body) - hold])

    def finish(self) -> str:
        """Release what was held back (the request ended without completing a stop string)."""
        return "" if self.stopped else self._release(self.text())

    @property
    def released(self) -> str:
        """All the text released so far: the whole completion once finish() has run."""
        return self.text()[:self.sent]

    def _release(self, upto: str) -> str:
        delta = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return delta


def finish_reason(engine_reason: str, stopped_by_string: bool) -> str:
    return "stop" if stopped_by_string else _FINISH.get(engine_reason, engine_reason)


def usage(req: CompletionRequest, completion_tokens: int) -> dict:
    n = len(req.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def chunk(cid: str, req: CompletionRequest, text: str, reason: str | None, first: bool = False,
          logprobs: dict | None = None, index: int = 0, tool_calls: list | None = None) -> dict:
    """One stream chunk of choice `index`: a text delta (and, with reason, the end) and its
    tokens' logprobs, or tool_calls entries (openai_choices.Choice.delta_calls). A chat stream's
    first chunk of a choice carries the assistant role, as OpenAI's does."""
    if not req.chat:
        choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
        return _answer(cid, req, "text_completion", [choice])
    delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
    if tool_calls:
        delta["tool_calls"] = tool_calls
    choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
    return _answer(cid, req, "chat.completion.chunk", [choice])


def answer(cid: str, req: CompletionRequest, choices: list[tuple], usage_: dict) -> dict:
    """The whole (non-streamed) completion: (text or None, finish reason, logprobs, tool calls or
    None) per choice."""
    def choice(i: int, text: str | None, reason: str, logprobs: dict | None, calls: list | None) -> dict:
        message = {"role": "assistant", "content": text} | ({"tool_calls": calls} if calls else {})
        body = {"message": message} if req.chat else {"text": text}
        return dict(index=i, **body, finish_reason=reason, logprobs=logprobs)
    return dict(_answer(cid, req, "chat.completion" if req.chat else "text_completion",
                        [choice(i, *c) for i, c in enumerate(choices)]), usage=usage_)


def usage_chunk(cid: str, req: CompletionRequest, usage_: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return dict(_answer(cid, req, "chat.completion.chunk" if req.chat else "text_completion", []), usage=usage_)


def _answer(cid: str, req: CompletionRequest, obj: str, choices: list[dict]) -> dict:
    return {"id": cid, "object": obj, "created": int(time.time()), "model": req.model, "choices": choices}


def error(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error object; its type follows the status as OpenAI's own server names them."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def models(model_name: str) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "tarragon_jax",
                                        "created": 0}]}
