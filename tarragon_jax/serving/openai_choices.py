"""The n choices of an OpenAI completion as they stream: each its own engine request, text,
stop strings and logprobs; their chunks merged in the order they come.

Each choice is a request of its own, seeded from the request's seed (choice i draws with seed +
i, as vLLM seeds parallel samples), so a moved or replayed choice draws the same tokens. They
share the prompt's KV pages: where the prompt can come from the prefix cache, choice 0 runs
first and the others are submitted once its prompt is computed (its first token), so they read
the prompt's blocks from the cache instead of computing them again (SGLang caches the prefix
before forking its parallel samples the same way).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Callable

from tarragon_jax.serving import openai_api, openai_tools
from tarragon_jax.serving.openai_logprobs import Logprobs, TokenTexts

_DONE = object()


class Choice:
    """One choice: its engine request's TokenEvents turned into text deltas, logprobs and the end."""

    def __init__(self, index: int, rid: int, events: AsyncIterator, req: openai_api.CompletionRequest, tokenizer,
                 token_texts: TokenTexts):
        self.index, self.rid, self.events, self.req = index, rid, events, req
        self.text = openai_api.TextStream(tokenizer, req.stop)
        self.logprobs = None if req.sampling.logprobs is None else Logprobs(token_texts, req.chat)
        self.echoed = (tokenizer.decode(req.prompt_ids) if tokenizer is not None else "") if req.echo else ""
        self._pending: list = []           # (token, TokenLogprob) not yet in a chunk
        self.tools = req.tool_choice.mode != "none"    # the text may be tool calls: held to the end ...
        self.named = req.tool_choice.mode == "named"   # ... but one call's arguments stream as they come
        self.call_id = openai_tools.call_id() if self.named else None
        self._streamed = False             # a named call's first arguments delta went out (it names the call)
        self.content: str | None = None    # once ended: the message content (None: tool calls alone)
        self.tool_calls: list | None = None

    def _taken(self) -> list:
        out, self._pending[:] = list(self._pending), []
        return out

    def format(self, tokens: list) -> dict | None:
        return None if self.logprobs is None else self.logprobs.format(tokens)

    def delta_calls(self, delta: str, ended: bool) -> tuple[str, list | None]:
        """(content delta, tool_calls entries) of a stream chunk: a named call's arguments go
        out as they come; other calls whole, in the last chunk."""
        if self.named:
            if not delta:
                return "", None
            first, self._streamed = not self._streamed, True
            return "", [openai_tools.argument_delta(self.req.tool_choice, self.call_id, delta, first)]
        if ended and self.tool_calls:
            return delta, [dict(c, index=i) for i, c in enumerate(self.tool_calls)]
        return delta, None

    async def chunks(self, finish: Callable[[int], Awaitable]):
        """(delta, None, its tokens' logprobs) per token with text (with echo, the prompt's
        first), then (the last delta, (finish reason, completion tokens), logprobs) at the end,
        when `content` and `tool_calls` are set (with tools, the text is held to the end: it may
        be calls); nothing more if the client left (the request is cancelled). finish(rid): the
        engine forgets a finished request."""
        req, n, reason = self.req, 0, ""
        async with contextlib.aclosing(self.events) as tokens:
            async for ev in tokens:
                if ev.index == 0 and req.echo:
                    if ev.prompt_logprobs is not None:
                        self._pending.extend(zip(req.prompt_ids, (None,) + ev.prompt_logprobs))
                    yield self.echoed, None, self._taken()
                if req.max_tokens == 0:           # echo of the prompt alone: its one token (the
                    reason = "length"             # request's last: it has finished) is not sent
                    break
                n += 1                           # a stop token counts but adds no text
                delta = "" if ev.finish_reason == "stop" else self.text.push(ev.token)
                if ev.logprob is not None and ev.finish_reason != "stop":
                    self._pending.append((ev.token, ev.logprob))
                if delta and (self.named or not self.tools):
                    yield delta, None, self._taken()
                if self.text.stopped:
                    reason = "stop"
                    break
                reason = ev.finish_reason
        if not reason:                           # the client left; the request is cancelled
            return
        if not self.text.stopped:
            await finish(self.rid)
        last, reason = self.text.finish(), openai_api.finish_reason(reason, self.text.stopped)
        self.content = self.echoed + self.text.released
        if self.tools:                          # the whole text, now: content and tool calls
            self.content, self.tool_calls = openai_tools.calls(req.tool_choice, self.text.released, self.call_id)
            if not self.named:
                last = self.content or ""
                reason = "tool_calls" if self.tool_calls else reason
        yield last, (reason, n), self._taken()


async def chained(first, rest: AsyncIterator):
    """`first`, then what `rest` yields (an event already taken from it); closing this closes rest."""
    async with contextlib.aclosing(rest):
        yield first
        async for x in rest:
            yield x


async def merged(streams: list[AsyncIterator]):
    """(i, item) from every stream as items come; the first error raised in any is raised here,
    and leaving early closes them all (their requests are cancelled)."""
    if len(streams) == 1:                        # the common case: no tasks
        async with contextlib.aclosing(streams[0]) as only:
            async for x in only:
                yield 0, x
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(stream) as it:
                async for x in it:
                    await queue.put((i, x))
            await queue.put((i, _DONE))
        except Exception as e:                   # noqa: BLE001 -- handed to the consumer
            await queue.put((i, e))
    tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, x = await queue.get()
            if x is _DONE:
                live -= 1
            elif isinstance(x, Exception):
                raise x
            else:
                yield i, x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
