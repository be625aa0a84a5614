"""OpenAI's "logprobs" objects: completions' (tokens, token_logprobs, top_logprobs, text_offset)
and chat's (content: token, logprob, bytes, top_logprobs), from the engine's TokenLogprobs.

A token's text is its own decoding. For a byte-level BPE tokenizer (GPT-2's alphabet: Qwen,
Llama 3, DeepSeek, the demo model) a token may hold part of a character, whose text alone is
U+FFFD; its "bytes" are then the bytes it stands for, so a chat answer's tokens' bytes always
add up to its text, as OpenAI's field intends.
"""
from __future__ import annotations

import json

from tarragon_jax.workers.sequence import TokenLogprob


def _byte_values() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes_to_unicode), inverted: character -> the byte it
    stands for (printable bytes stand for themselves, the others for 256, 257, ... in order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + n)], n = b, n + 1
    return out


class TokenTexts:
    """A token's text (its own decoding; token_id:N without a tokenizer, as vLLM writes it) and
    bytes: for a byte-level BPE tokenizer the bytes the token stands for, so the tokens of a
    character split over several add up to it, which is what OpenAI's "bytes" field is for."""

    def __init__(self, tokenizer):
        self.tokenizer, self._bytes = tokenizer, None
        if tokenizer is not None and "ByteLevel" in json.dumps(json.loads(tokenizer.to_str()).get("decoder")):
            self._bytes = _byte_values()

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"

    def bytes(self, token: int) -> list[int]:
        if self._bytes is None:
            return list(self.text(token).encode())
        return [self._bytes[c] for c in self.tokenizer.id_to_token(token)]


class Logprobs:
    """The "logprobs" object of OpenAI's answers for some of a completion's tokens, in order."""

    def __init__(self, texts: TokenTexts, chat: bool):
        self.texts, self.chat = texts, chat
        self.offset = 0            # completions' text_offset: characters of the tokens formatted before

    def format(self, tokens: list[tuple[int, TokenLogprob | None]]) -> dict:
        """None for a token with no logprob: an echoed prompt's first (completions only)."""
        if self.chat:
            def entry(t: int, lp: float) -> dict:
                return {"token": self.texts.text(t), "logprob": lp, "bytes": self.texts.bytes(t)}
            return {"content": [dict(entry(t, lp.logprob), top_logprobs=[entry(j, v) for j, v in lp.top])
                                for t, lp in tokens], "refusal": None}
        texts, offsets = [self.texts.text(t) for t, _ in tokens], []
        for s in texts:
            offsets.append(self.offset)
            self.offset += len(s)
        tops = []
        for (t, lp), s in zip(tokens, texts):         # the n best, and the chosen token's (up to n + 1)
            if lp is None:
                tops.append(None)
                continue
            top = {self.texts.text(j): v for j, v in lp.top}
            tops.append(top | ({} if s in top else {s: lp.logprob}))
        return {"tokens": texts, "token_logprobs": [None if lp is None else lp.logprob for _, lp in tokens],
                "top_logprobs": tops, "text_offset": offsets}
