"""HTTP front end: FastAPI on uvicorn, async handlers; the engine stays on its one loop thread.

Endpoints (JSON in, JSON out; every error is OpenAI's {"error": {"message", "type", "param", "code"}}):

  POST /generate             {"prompt_ids": [int] | "prompt": str, "max_new_tokens", "temperature",
                              "top_p", "seed", "stop_token_ids", "stream", "presence_penalty",
                              "frequency_penalty", "repetition_penalty", "logit_bias": {"id": bias},
                              "grammar": an llguidance grammar}
                              -> {"request_id", "output_ids",
                              "text"?, "finish_reason", "ttft_s"}; stream: one JSON line per token, then
                              the summary line
  POST /v1/completions, POST /v1/chat/completions, GET /v1/models: the OpenAI API (openai_api.py),
                              server-sent events when streaming
  GET  /health               workers (and each one's pid, node, devices), ERT version, recoveries,
                              load; 503 while draining, when the
                              engine loop died, or when it does not answer within health_timeout_s
                              (a stuck step)
  GET  /metrics              Prometheus text format (prometheus_metrics.py)
  POST /fail                 {"worker": "ew1"}: fail-stop a worker now (allow_faults only; for demos):
                              checked and killed in one closure on the engine thread
  POST /reset_prefix_cache   every AW forgets its cached prefixes (as vLLM's): a benchmark pass starts cold
  POST /tokenize, POST /detokenize, GET /tokenizer_info: the checkpoint's tokenizer, as vLLM's server
                              serves it (tokenizer_api.py; lm-evaluation-harness tokenizes through them)

With an API key (`api_key`; launch/serve.py's --api_key or TARRAGON_API_KEY), every endpoint but
/health and /metrics needs `Authorization: Bearer <key>` (401 otherwise), as vLLM's --api-key.

Robust by default: a body over max_body_bytes gets 413; headers not complete within
header_timeout_s, or a body not complete within body_timeout_s (e.g. a Content-Length longer than
what is sent), get 408 and the connection is closed; a malformed request line or header (e.g. a
negative Content-Length) gets 400 from the protocol layer. Past the admission limit (default: the
KV pages of all AWs, since even the shortest requests cannot all hold a page past that) a new
request gets 429; while draining, 503. No connection holds a thread: they are asyncio tasks, and a
client that disconnects cancels its request (pages and snapshots freed) within 0.25 s or at its
next token.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import socket
import threading
import time
from typing import Callable

import fastapi
import h11
import starlette.exceptions
import starlette.requests
import uvicorn
from fastapi.responses import JSONResponse, Response, StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from tarragon_jax.config import ConfigError, SamplingParams
from tarragon_jax.errors import RequestError
from tarragon_jax.serving import openai_api, openai_logprobs, tokenizer_api
from tarragon_jax.serving.openai_choices import Choice, chained, merged
from tarragon_jax.serving.engine import Engine
from tarragon_jax.serving.engine_loop import EngineLoop, EngineStopped, Refused

_SAMPLING = {f.name for f in dataclasses.fields(SamplingParams)}
_FIELDS = _SAMPLING | {"prompt_ids", "prompt", "stream"}
AUTO = -1                     # max_unfinished: sized from the KV pages


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 1 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    health_timeout_s: float = 5.0     # /health's probe through the engine thread
    keep_alive_s: int = 75            # an idle keep-alive connection's life (nginx's default): longer than
                                      # clients keep theirs (httpx 5 s), so a client never reuses one the
                                      # server is closing that instant (equal timeouts race: "Connection error")


class _EngineDied(RuntimeError):
    """The engine loop died while this request was running (its clients get an error, not a hang)."""


def health(engine: Engine) -> dict:
    ctl = engine.controller
    state = {w.handle.name: ("failed" if ctl.health.is_failed(w.handle.name) else "ok") for w in ctl.aws + ctl.ews}
    return {"workers": state, "processes": ctl.processes(), "recovering": ctl.recovering,
            "ert_version": ctl.ert.version, "unfinished_requests": engine.num_unfinished,
            "recoveries": [dataclasses.asdict(r) for r in ctl.records]}


def kv_admission_limit(engine: Engine) -> int:
    """Requests in flight past which new ones are refused by default: one per KV page of the AWs."""
    return sum(aw.blocks.capacity for aw in engine.aws)


def fail_worker(name) -> Callable[[Engine], str]:
    """The /fail closure: check and kill as one step on the engine thread, so two concurrent calls
    cannot both pass the check and take down the last live AW (or EW) between them."""
    def fail(engine: Engine) -> str:
        ctl = engine.controller
        up = {w.handle.name: not ctl.health.is_down(w.handle.name) for w in ctl.aws + ctl.ews}
        if name not in up:
            raise ValueError(f'"worker" must be one of {list(up)}, got {name!r}')
        if not up[name] or sum(u for w, u in up.items() if w[:2] == name[:2]) < 2:
            raise ValueError(f"{name} is already down, or is the last live {name[:2].upper()}: killing it would "
                             f"stop the service")
        ctl.kill(name)
        return name
    return fail


def parse_generate(body: dict, tokenizer) -> tuple[list, SamplingParams, bool]:
    """(prompt ids, sampling, stream) from a /generate body; ValueError names what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    if ("prompt_ids" in body) == ("prompt" in body):
        raise ValueError('give exactly one of "prompt_ids" (token ids) or "prompt" (text)')
    if "prompt" in body:
        if tokenizer is None:
            raise ValueError('"prompt" needs a tokenizer (tokenizer.json in the checkpoint); send "prompt_ids"')
        if not isinstance(body["prompt"], str):
            raise ValueError('"prompt" must be a string')
        prompt = tokenizer.encode(body["prompt"]).ids
    else:
        prompt = body["prompt_ids"]
        if not isinstance(prompt, list) or not all(type(t) is int for t in prompt):
            raise ValueError('"prompt_ids" must be a list of integers')
    kw = {k: body[k] for k in _SAMPLING if k in body}
    if "stop_token_ids" in kw:
        if not isinstance(kw["stop_token_ids"], list):
            raise ValueError('"stop_token_ids" must be a list of integers')
        kw["stop_token_ids"] = tuple(kw["stop_token_ids"])
    if "logit_bias" in kw:
        kw["logit_bias"] = openai_api.logit_bias(kw["logit_bias"])
    if not isinstance(body.get("stream", False), bool):
        raise ValueError('"stream" must be true or false')
    try:
        sampling = SamplingParams(**kw)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return prompt, sampling, body.get("stream", False)


class _Stream:
    """One request's TokenEvents, from the engine thread into this handler's asyncio queue."""

    def __init__(self):
        self.aloop, self.queue, self.closed = asyncio.get_running_loop(), asyncio.Queue(), False

    def sink(self, ev) -> bool:                 # on the engine thread
        if self.closed:
            return False
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, ev)
            return True
        except RuntimeError:                    # the server's event loop is gone
            return False


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol plus what it lacks: a deadline on the request line and headers (a
    client that sends half a request otherwise holds the connection forever), and protocol
    errors answered as OpenAI error objects."""
    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()                                   # the next request's headers: a new deadline

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)

    def _arm(self) -> None:
        self._got_bytes = False
        self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE or not self._got_bytes:
            return      # closed, its headers arrived in time, or idle (uvicorn closes it after keep_alive_s)
        self._send_error(408, f"request headers not complete within {self.header_timeout_s} s")

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, f"malformed HTTP request: {msg}")

    def _send_error(self, status: int, message: str) -> None:
        body = json.dumps(openai_api.error(message, status)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:                # a response was already under way
            pass
        self.transport.close()


class Server:
    """The engine loop behind an HTTP port. `start()` serves from a background thread (tests,
    notebooks, launch/serve.py); `shutdown()` stops it; `drain()` refuses new requests and waits
    for the ones in flight."""

    def __init__(self, loop: EngineLoop, host: str = "127.0.0.1", port: int = 8000, tokenizer=None,
                 allow_faults: bool = False, model_name: str = "tarragon", eos_ids: tuple = (),
                 max_unfinished: int | None = AUTO, chat_template=None, limits: HttpLimits = HttpLimits(),
                 api_key: str | None = None):
        """model_name: what /v1/models reports and the OpenAI API accepts; eos_ids: token ids that
        end an OpenAI completion (generation_config.json's eos_token_id); max_unfinished: requests
        in flight past which new ones get 429 (AUTO: kv_admission_limit; None: no limit);
        chat_template: a ChatTemplate (None: chat requests get 400); api_key: required of every
        request but /health and /metrics (None or "": open). /metrics shows the loop's."""
        self.loop, self.tokenizer, self.allow_faults, self.limits = loop, tokenizer, allow_faults, limits
        self.token_texts = openai_logprobs.TokenTexts(tokenizer)     # logprobs' token texts and bytes
        self.api_key = api_key or None
        self.model_name, self.eos_ids, self.chat_template = model_name, tuple(eos_ids), chat_template
        self.max_unfinished = loop.call(kv_admission_limit) if max_unfinished == AUTO else max_unfinished
        self.prefix_caching = loop.engine.config.prefix_caching
        self.max_model_len = loop.engine.model.max_position
        self._draining = threading.Event()
        self._handlers = 0
        self.app = _app(self)
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.server_address = self._sock.getsockname()[:2]
        protocol = type("Protocol", (_Protocol,), {"header_timeout_s": limits.header_timeout_s})
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, http=protocol, lifespan="off", log_level="warning",
                                                      timeout_keep_alive=limits.keep_alive_s, access_log=False))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._sock]},
                                        name="http", daemon=True)
        self._thread.start()
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._sock.close()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests (503), wait up to timeout_s for the ones in flight to finish and their
        answers to be written; True if they all did."""
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                idle = self.loop.call(lambda engine: engine.num_unfinished) == 0
            except EngineStopped:
                return False
            if idle and self._handlers == 0:
                return True
            time.sleep(0.05)
        return False

    # ---- the handlers' helpers (on the server's event loop) -----------------------------------
    async def body(self, request: fastapi.Request):
        """The JSON body, within the size and time limits (413, 408), or 400 naming the problem."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_body_bytes:
            raise Refused(413, f"request body of {size} bytes is over the limit of {self.limits.max_body_bytes}")

        async def read() -> bytes:
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > self.limits.max_body_bytes:
                    raise Refused(413, f"request body is over the limit of {self.limits.max_body_bytes} bytes")
            return bytes(data)
        try:
            data = await asyncio.wait_for(read(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, f"request body not complete within {self.limits.body_timeout_s} s") from None
        try:
            return json.loads(data or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"malformed JSON: {e}") from None

    async def submit(self, prompt_ids, sampling: SamplingParams) -> tuple[int, _Stream]:
        if self.draining:
            raise Refused(503, "the server is draining (shutting down): no new requests")
        stream = _Stream()
        try:
            rid = await self.loop.call_async(self.loop.accept(prompt_ids, sampling, stream.sink, self.max_unfinished))
        except asyncio.CancelledError:
            stream.closed = True          # accepted after all? the loop cancels it at its first token
            raise
        return rid, stream

    async def tokens(self, request: fastapi.Request, rid: int, stream: _Stream):
        """The request's TokenEvents until it finishes. A client that hangs up (checked at every
        token, and every 0.25 s without one) or a consumer that stops early cancels the request;
        raises _EngineDied if the engine loop dies meanwhile."""
        done = False
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(stream.queue.get(), 0.25)
                except asyncio.TimeoutError:
                    ev = None
                if await request.is_disconnected():
                    return
                if ev is None:
                    continue
                if isinstance(ev, BaseException):
                    done = True
                    raise _EngineDied(f"engine failed: {ev!r}")
                done = ev.finished
                yield ev
                if done:
                    return
        finally:
            if not done:
                self.cancel(rid, stream)

    def cancel(self, rid: int, stream: _Stream) -> None:
        """Nobody reads this request any more: the engine drops it at its next step."""
        stream.closed = True
        with contextlib.suppress(EngineStopped):
            self.loop.post(self.loop.cancel(rid))

    async def choices(self, request: fastapi.Request, req: openai_api.CompletionRequest) -> list[Choice] | None:
        """Submit an OpenAI request's n choices (openai_choices); None if the client left before
        the first choice's prompt was computed. Refused (e.g. 429) cancels those already in."""
        submitted: list = []
        try:
            rid, events = await self.submit(req.prompt_ids, req.choice_sampling(0))
            submitted.append((rid, events))
            first = self.tokens(request, rid, events)
            if req.n > 1 and self.prefix_caching and req.sampling.prompt_logprobs is None:
                try:                     # the others wait for its prompt's blocks, then share them
                    first = chained(await anext(first), first)
                except StopAsyncIteration:
                    return None
            out = [Choice(0, rid, first, req, self.tokenizer, self.token_texts)]
            for i in range(1, req.n):
                rid, events = await self.submit(req.prompt_ids, req.choice_sampling(i))
                submitted.append((rid, events))
                out.append(Choice(i, rid, self.tokens(request, rid, events), req, self.tokenizer, self.token_texts))
            return out
        except BaseException:
            for rid, events in submitted:
                self.cancel(rid, events)
            raise

    async def finish(self, rid: int) -> float | None:
        """A finished request's TTFT; its records are dropped (a long-running server would grow)."""
        def finish(engine: Engine) -> float | None:
            times = engine.metrics.requests.get(rid)
            engine.forget(rid)
            return times.ttft_s if times else None
        return await self.loop.call_async(finish)


class _RequireKey:
    """ASGI middleware: with an API key set, every endpoint but /health and /metrics (what probes
    and scrapers read) needs `Authorization: Bearer <key>`; anything else gets 401 and an OpenAI
    error object. The keys are compared as SHA-256 digests with hmac.compare_digest: the time
    taken says nothing about the key, not even its length."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app, key: str):
        self.app, self.digest = app, hashlib.sha256(key.encode()).digest()

    def allowed(self, headers: list) -> bool:
        given = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.digest) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN or self.allowed(scope["headers"]):
            return await self.app(scope, receive, send)
        response = JSONResponse(openai_api.error("missing or wrong API key: send 'Authorization: Bearer <key>'", 401),
                                status_code=401, headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)


class _CountHandlers:
    """ASGI middleware: requests being handled, their streamed answers included (drain waits)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.server._handlers += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.server._handlers -= 1


def _error(status: int, message: str) -> JSONResponse:
    headers = {"connection": "close"} if status in (408, 413) else None    # the body may be half read
    return JSONResponse(openai_api.error(message, status), status_code=status, headers=headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _app(s: Server) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="tarragon_jax", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ValueError)           # RequestError, parse errors, template rejections
    async def _bad_request(_, e: ValueError):
        return _error(400, str(e))

    @app.exception_handler(Refused)
    async def _refused(_, e: Refused):
        return _error(e.status, str(e))

    @app.exception_handler(EngineStopped)
    async def _stopped(_, e: EngineStopped):
        return _error(503, str(e))

    @app.exception_handler(starlette.exceptions.HTTPException)
    async def _framework(request, e):            # unknown path (404), wrong method (405)
        return _error(e.status_code, f"no such endpoint: {request.method} {request.url.path}"
                      if e.status_code in (404, 405) else str(e.detail))

    @app.exception_handler(starlette.requests.ClientDisconnect)
    async def _gone(_, e):                       # left while sending its body: nobody to answer
        return Response(status_code=499)

    app.add_middleware(_CountHandlers, server=s)
    if s.api_key:
        app.add_middleware(_RequireKey, key=s.api_key)

    @app.get("/health")
    async def _health():
        try:
            state = await s.loop.call_async(health, timeout_s=s.limits.health_timeout_s)
        except TimeoutError as e:
            return JSONResponse({"status": "stuck", "error": openai_api.error(f"{e}: a step is stuck", 503)["error"],
                                 "draining": s.draining}, status_code=503)
        return JSONResponse(dict(state, status="draining" if s.draining else "ok", draining=s.draining),
                            status_code=503 if s.draining else 200)

    @app.get("/metrics")
    async def _metrics():
        with contextlib.suppress(TimeoutError):      # a stuck loop: the last values, still parseable
            await s.loop.call_async(s.loop.metrics.refresh, timeout_s=s.limits.health_timeout_s)
        return Response(s.loop.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def _models():
        return openai_api.models(s.model_name)

    @app.get("/tokenizer_info")
    async def _tokenizer_info():
        return tokenizer_api.info(s.tokenizer, s.eos_ids, s.chat_template, s.max_model_len)

    @app.post("/tokenize")
    async def _tokenize(request: fastapi.Request):
        return tokenizer_api.tokenize(await s.body(request), s.tokenizer, s.chat_template, s.max_model_len)

    @app.post("/detokenize")
    async def _detokenize(request: fastapi.Request):
        return tokenizer_api.detokenize(await s.body(request), s.tokenizer)

    @app.post("/reset_prefix_cache")
    async def _reset_prefix_cache():
        return {"blocks_dropped": await s.loop.call_async(lambda engine: engine.reset_prefix_cache())}

    @app.post("/fail")
    async def _fail(request: fastapi.Request):
        if not s.allow_faults:
            raise Refused(403, "fault injection is off (serve with --allow_fault_injection)")
        body = await s.body(request)
        name = body.get("worker") if isinstance(body, dict) else None
        return {"killed": await s.loop.call_async(fail_worker(name))}

    @app.post("/generate")
    async def _generate(request: fastapi.Request):
        prompt, sampling, stream = parse_generate(await s.body(request), s.tokenizer)
        rid, events = await s.submit(prompt, sampling)

        async def lines():
            out, reason = [], ""
            try:
                async with contextlib.aclosing(s.tokens(request, rid, events)) as tokens:
                    async for ev in tokens:
                        out.append(ev.token)
                        reason = ev.finish_reason
                        if stream:
                            yield json.dumps({"token": ev.token, "index": ev.index}) + "\n"
            except _EngineDied as e:
                yield {"error": openai_api.error(str(e), 500)["error"], "request_id": rid}
                return
            if not reason:                           # the client left; the request is cancelled
                return
            summary = {"request_id": rid, "output_ids": out, "finish_reason": reason, "ttft_s": await s.finish(rid)}
            if s.tokenizer is not None:
                summary["text"] = s.tokenizer.decode(out)
            yield summary
        if stream:
            async def ndjson():
                async for part in lines():
                    yield part if isinstance(part, str) else json.dumps(dict(part, finished="error" not in part)) + "\n"
            return StreamingResponse(ndjson(), media_type="application/x-ndjson")
        result = None
        async for part in lines():
            result = part
        if result is None:
            return Response(status_code=499)         # nobody is listening
        return JSONResponse(result, status_code=500 if "error" in result else 200)

    async def completion(request: fastapi.Request, req: openai_api.CompletionRequest):
        """Both OpenAI APIs: each choice's tokens as text; stop strings end a choice early
        (cancelled in the engine, so its pages are freed at once)."""
        try:
            choices = await s.choices(request, req)
        except _EngineDied as e:
            return _error(500, str(e))
        if choices is None:
            return Response(status_code=499)         # nobody is listening
        cid = openai_api.new_id(req.chat)
        streams = [c.chunks(s.finish) for c in choices]
        if not req.stream:
            ends, every = [None] * req.n, [[] for _ in choices]
            try:
                async for i, (_, end, tokens) in merged(streams):
                    every[i] += tokens
                    ends[i] = end or ends[i]
            except _EngineDied as e:
                return _error(500, str(e))
            if None in ends:
                return Response(status_code=499)
            return openai_api.answer(cid, req, [(c.content, end[0], c.format(lp), c.tool_calls)
                                                for c, end, lp in zip(choices, ends, every)],
                                     openai_api.usage(req, sum(end[1] for end in ends)))

        async def sse():
            if req.chat:
                for c in choices:
                    yield _sse(openai_api.chunk(cid, req, "", None, first=True, index=c.index))
            ended, n_tokens = 0, 0
            try:
                async for i, (delta, end, tokens) in merged(streams):
                    lp = choices[i].format(tokens)
                    text, calls = choices[i].delta_calls(delta, end is not None)
                    yield _sse(openai_api.chunk(cid, req, text, end and end[0], logprobs=lp, index=i,
                                                tool_calls=calls))
                    if end is None:
                        continue
                    ended, n_tokens = ended + 1, n_tokens + end[1]
                    if ended < req.n:
                        continue
                    if req.include_usage:
                        yield _sse(openai_api.usage_chunk(cid, req, openai_api.usage(req, n_tokens)))
                    yield "data: [DONE]\n\n"
            except _EngineDied as e:
                yield _sse(openai_api.error(str(e), 500))
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def _completions(request: fastapi.Request):
        return await completion(request, openai_api.parse_completion(await s.body(request), s.tokenizer,
                                                                      s.model_name, s.eos_ids))

    @app.post("/v1/chat/completions")
    async def _chat(request: fastapi.Request):
        return await completion(request, openai_api.parse_chat(await s.body(request), s.tokenizer, s.chat_template,
                                                               s.model_name, s.eos_ids))

    return app
