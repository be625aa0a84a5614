"""HTTP front end: one thread owns the engine; stdlib HTTP handler threads talk to it by queue.

The engine is single-threaded by design (stage programs, schedulers, the controller), so an
`EngineLoop` thread is the only caller: handlers hand it closures and wait on futures; tokens
go back through one queue per request. Endpoints (JSON in, JSON out):

  POST /generate  {"prompt_ids": [int] | "prompt": str, "max_new_tokens", "temperature", "top_p",
                   "seed", "stop_token_ids", "stream": bool}
                  -> {"request_id", "output_ids", "text"?, "finish_reason", "ttft_s"}
                  stream: one JSON line per token {"token", "index"}, then the summary line
  GET  /health    workers (ok | failed | recovering), ERT version, recoveries so far, load,
                  draining (then the status is 503)
  POST /fail      {"worker": "ew1"}: fail-stop a worker now (only with allow_faults; for demos)
  POST /v1/completions, GET /v1/models: the OpenAI API (openai_api.py), SSE when streaming

A malformed request gets 400 with the reason (bad JSON, unknown field, prompt too long, ...) and
never touches requests already accepted. Past `max_unfinished` requests in flight a new one gets
429 (the client backs off; nothing queues without bound); once `drain()` is called (SIGTERM in
launch/serve.py) new requests get 503 while the ones in flight finish. A client that disconnects cancels its request (pages and
snapshots freed at once): a streaming one at its next token, any other within 0.25 s.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.server
import json
import queue
import select
import socket
import threading
import time
from typing import Callable

from tarragon_jax.config import ConfigError, SamplingParams
from tarragon_jax.errors import RequestError
from tarragon_jax.serving import openai_api
from tarragon_jax.serving.engine import Engine

_SAMPLING = {f.name for f in dataclasses.fields(SamplingParams)}
_FIELDS = _SAMPLING | {"prompt_ids", "prompt", "stream"}


class EngineStopped(RuntimeError):
    """The engine loop died (an engine error, or no healthy worker left); the server answers 503."""


class Unavailable(RuntimeError):
    """The server does not take the request now: overloaded (429) or draining (503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _EngineDied(RuntimeError):
    """The engine loop died while this request was running (its clients get an error, not a hang)."""


class EngineLoop(threading.Thread):
    """Steps the engine while it has work, and ticks its controller while idle (heartbeats,
    replacement joins); runs handler closures between steps."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.01):
        super().__init__(name="engine-loop", daemon=True)
        self.engine, self.idle_wait_s = engine, idle_wait_s
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[int, queue.Queue] = {}
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    def call(self, fn: Callable[[Engine], object]):
        """Run fn(engine) on the engine thread; returns its result or raises its exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, fut))
        while True:                       # never wait on a loop that died after the put
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if self.error is not None or not self.is_alive():
                    raise EngineStopped(f"engine loop stopped: {self.error!r}") from None

    def submit(self, prompt_ids, sampling: SamplingParams, max_unfinished: int | None = None) -> tuple[int, queue.Queue]:
        """Accept a request (RequestError if invalid; Unavailable 429 past max_unfinished requests
        in flight, checked on the engine thread so concurrent clients cannot overshoot); its
        TokenEvents arrive on the queue."""
        out: queue.Queue = queue.Queue()

        def accept(engine: Engine) -> int:
            engine.validate(prompt_ids, sampling)      # a bad request is a 400 even when we are full
            if max_unfinished is not None and engine.num_unfinished >= max_unfinished:
                raise Unavailable(429, f"overloaded: {engine.num_unfinished} requests in flight "
                                       f"(limit {max_unfinished}); retry later")
            rid = engine.submit(prompt_ids, sampling)
            self._streams[rid] = out
            return rid
        return self.call(accept), out

    def cancel(self, rid: int) -> bool:
        """The client went away: stop the request and free what it holds."""
        def drop(engine: Engine) -> bool:
            self._streams.pop(rid, None)
            cancelled = engine.cancel(rid)
            engine.forget(rid)
            return cancelled
        return self.call(drop)

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.engine.has_work:
                    self._drain(block=True)
                    self.engine.idle()
                    continue
                self._drain(block=False)
                for ev in self.engine.step():
                    stream = self._streams.get(ev.request_id)
                    if stream is not None:
                        stream.put(ev)
                        if ev.finished:
                            del self._streams[ev.request_id]
        except BaseException as e:  # noqa: BLE001 -- report to every waiting client, then stop
            self.error = e
            for stream in self._streams.values():
                stream.put(e)
            self._drain(block=False)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if self.error is not None:
                fut.set_exception(EngineStopped(f"engine loop stopped: {self.error!r}"))
            else:
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 -- the caller's error, raised in its thread
                    fut.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def health(engine: Engine) -> dict:
    ctl = engine.controller
    state = {w.handle.name: ("failed" if ctl.health.is_failed(w.handle.name) else "ok") for w in ctl.aws + ctl.ews}
    return {"workers": state, "recovering": ctl.recovering, "ert_version": ctl.ert.version,
            "unfinished_requests": engine.num_unfinished,
            "recoveries": [dataclasses.asdict(r) for r in ctl.records]}


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
    if not isinstance(body.get("stream", False), bool):
        raise ValueError('"stream" must be true or false')
    try:
        sampling = SamplingParams(**kw)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return prompt, sampling, body.get("stream", False)


class Handler(http.server.BaseHTTPRequestHandler):
    server: "Server"

    def log_message(self, fmt, *args) -> None:      # quiet: the engine's metrics are the log
        pass

    _streaming = False

    def _json(self, code: int, obj: dict) -> None:
        if self._streaming:     # an error after a stream began: the stream just ends (no 2nd status)
            return
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(n) or b"null")
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON: {e}") from None

    def do_GET(self) -> None:
        try:
            if self.path == "/health":       # 503 while draining: load balancers stop sending here
                draining = self.server.draining
                self._json(503 if draining else 200, dict(self.server.loop.call(health), draining=draining))
            elif self.path == "/v1/models":
                self._json(200, openai_api.models(self.server.model_name))
            else:
                self._json(404, {"error": f"no such endpoint: GET {self.path}"})
        except EngineStopped as e:
            self._json(503, {"error": str(e)})

    def do_POST(self) -> None:
        self._streaming = False
        with self.server.in_flight():
            self._post()

    def _post(self) -> None:
        try:
            if self.path == "/generate":
                self._generate(*parse_generate(self._body(), self.server.tokenizer))
            elif self.path == "/v1/completions":
                s = self.server
                self._completion(openai_api.parse_completion(self._body(), s.tokenizer, s.model_name, s.eos_ids))
            elif self.path == "/fail":
                self._fail(self._body())
            else:
                self._json(404, {"error": f"no such endpoint: POST {self.path}"})
        except (ValueError, RequestError) as e:
            self._json(400, {"error": str(e)})
        except Unavailable as e:
            self._json(e.status, {"error": str(e)})
        except EngineStopped as e:
            self._json(503, {"error": str(e)})

    def _client_gone(self) -> bool:
        """The peer closed its side (readable, and a peek reads EOF) while we were generating."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _fail(self, body) -> None:
        if not self.server.allow_faults:
            self._json(403, {"error": "fault injection is off (serve with --allow_fault_injection)"})
            return
        name = body.get("worker") if isinstance(body, dict) else None
        workers = self.server.loop.call(lambda e: {
            w.handle.name: w.handle.alive and not e.controller.health.is_failed(w.handle.name)
            for w in e.controller.aws + e.controller.ews})
        if name not in workers:
            raise ValueError(f'"worker" must be one of {list(workers)}, got {name!r}')
        live = [w for w, up in workers.items() if up]
        if name not in live or len([w for w in live if w[:2] == name[:2]]) < 2:
            raise ValueError(f"{name} is already down, or is the last live {name[:2].upper()}: killing it would "
                             f"stop the service")
        self.server.loop.call(lambda e: e.controller.kill(name))
        self._json(200, {"killed": name})

    def _events(self, rid: int, events: queue.Queue):
        """The request's TokenEvents until it finishes. Ends early, cancelling the request, if the
        client hangs up: noticed within 0.25 s by peeking the socket (a client sends nothing after
        its request; a stream that writes nothing, e.g. token ids without a tokenizer, must not
        run on), or when a write fails. Raises _EngineDied if the engine loop dies meanwhile."""
        next_check = time.monotonic() + 0.25
        while True:
            if time.monotonic() >= next_check:
                if self._client_gone():                 # e.g. a timed-out client: free its pages
                    self.server.loop.cancel(rid)
                    return
                next_check = time.monotonic() + 0.25
            try:
                ev = events.get(timeout=0.25)
            except queue.Empty:
                continue
            if isinstance(ev, BaseException):
                raise _EngineDied(f"engine failed: {ev!r}")
            yield ev
            if ev.finished:
                return

    def _start_stream(self, content_type: str) -> None:
        self._streaming = True                          # from now on no status line can be sent
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()

    def _write(self, rid: int, data: str) -> bool:
        """Send part of a streamed answer; False (request cancelled) if nobody reads any more."""
        try:
            self.wfile.write(data.encode())
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.server.loop.cancel(rid)                # nobody reads: free its pages now
            return False

    def _generate(self, prompt, sampling: SamplingParams, stream: bool) -> None:
        rid, events = self.server.submit(prompt, sampling)          # RequestError -> 400 above
        tok = self.server.tokenizer
        if stream:
            self._start_stream("application/x-ndjson")
        out, reason = [], ""
        try:
            for ev in self._events(rid, events):
                out.append(ev.token)
                if stream and not self._write(rid, json.dumps({"token": ev.token, "index": ev.index}) + "\n"):
                    return
                reason = ev.finish_reason
        except _EngineDied as e:
            error = {"error": str(e), "request_id": rid}
            if stream:
                self._write(rid, json.dumps(error) + "\n")
            else:
                self._json(500, error)
            return
        if not reason:                                   # the client left; the request is cancelled
            return

        def finish(engine: Engine) -> float:
            ttft = engine.metrics.requests[rid].ttft_s
            engine.forget(rid)
            return ttft
        ttft = self.server.loop.call(finish)
        summary = {"request_id": rid, "output_ids": out, "finish_reason": reason, "ttft_s": ttft}
        if tok is not None:
            summary["text"] = tok.decode(out)
        if stream:
            self._write(rid, json.dumps(dict(summary, finished=True)) + "\n")
        else:
            self._json(200, summary)

    def _completion(self, req: openai_api.CompletionRequest) -> None:
        """POST /v1/completions: the engine's tokens as OpenAI text; stop strings end the request
        early (cancelled in the engine, so its pages are freed at once)."""
        rid, events = self.server.submit(req.prompt_ids, req.sampling)
        cid, text = openai_api.new_id(), openai_api.TextStream(self.server.tokenizer, req.stop)
        sse = lambda obj: f"data: {json.dumps(obj)}\n\n"
        if req.stream:
            self._start_stream("text/event-stream")
        n, reason = 0, ""
        try:
            for ev in self._events(rid, events):
                n += 1                                   # a stop token counts but adds no text
                delta = "" if ev.finish_reason == "stop" else text.push(ev.token)
                if req.stream and delta and not self._write(rid, sse(openai_api.completion(cid, req, delta, None, None))):
                    return
                if text.stopped:
                    self.server.loop.cancel(rid)
                    reason = "stop"
                    break
                reason = ev.finish_reason
        except _EngineDied as e:
            error = {"error": {"message": str(e), "type": "server_error"}}
            if req.stream:
                self._write(rid, sse(error))
            else:
                self._json(500, error)
            return
        if not reason:                                   # the client left; the request is cancelled
            return
        if not text.stopped:
            self.server.loop.call(lambda engine: engine.forget(rid))
        tail, reason = text.finish(), openai_api.finish_reason(reason, text.stopped)
        usage = openai_api.usage(req, n)
        if not req.stream:
            self._json(200, openai_api.completion(cid, req, text.released, reason, usage))
            return
        self._write(rid, sse(openai_api.completion(cid, req, tail, reason, None)))
        if req.include_usage:
            self._write(rid, sse(dict(openai_api.completion(cid, req, "", None, usage), choices=[])))
        self._write(rid, "data: [DONE]\n\n")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, loop: EngineLoop, host: str = "127.0.0.1", port: int = 8000, tokenizer=None,
                 allow_faults: bool = False, model_name: str = "tarragon", eos_ids: tuple = (),
                 max_unfinished: int | None = None):
        """model_name: what /v1/models reports and /v1/completions accepts; eos_ids: token ids
        that end an OpenAI completion (the checkpoint's generation_config.json eos_token_id);
        max_unfinished: requests in flight past which new ones get 429 (None: no limit)."""
        super().__init__((host, port), Handler)
        self.loop, self.tokenizer, self.allow_faults = loop, tokenizer, allow_faults
        self.model_name, self.eos_ids, self.max_unfinished = model_name, tuple(eos_ids), max_unfinished
        self._draining = threading.Event()
        self._handlers, self._handlers_lock = 0, threading.Lock()

    @contextlib.contextmanager
    def in_flight(self):
        """Counts POST handlers mid-request, so drain() also waits for answers being written."""
        with self._handlers_lock:
            self._handlers += 1
        try:
            yield
        finally:
            with self._handlers_lock:
                self._handlers -= 1

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def submit(self, prompt_ids, sampling: SamplingParams) -> tuple[int, queue.Queue]:
        if self.draining:
            raise Unavailable(503, "the server is draining (shutting down): no new requests")
        return self.loop.submit(prompt_ids, sampling, self.max_unfinished)

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, wait up to timeout_s for the ones in flight to finish and their
        answers to be written; True if they all did."""
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                idle = self.loop.call(lambda engine: engine.num_unfinished) == 0
            except EngineStopped:
                return False
            with self._handlers_lock:
                if idle and self._handlers == 0:
                    return True
            time.sleep(0.05)
        return False
