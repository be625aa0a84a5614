"""Chat messages -> prompt text, by the checkpoint's own chat template, rendered as transformers
renders it (`apply_chat_template`): a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, the loop-controls extension, `raise_exception`, `strftime_now` and a `tojson` that
keeps non-ASCII text; variables `messages`, `add_generation_prompt`, the special tokens of
tokenizer_config.json (`bos_token`, `eos_token`, ...) and any extra keyword. A model answers
well only when its prompt is laid out exactly as in training, so the template is the model's,
never ours; a checkpoint without one gets a clear error instead of a guessed layout.
"""
from __future__ import annotations

import datetime
import functools
import json
import os

import jinja2
import jinja2.sandbox

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class NoChatTemplate(ValueError):
    """The checkpoint has no chat template: chat requests are refused (400), completions work."""


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict | None = None):
        """source: the jinja2 template text; special_tokens: e.g. {"eos_token": "<|im_end|>"}."""
        self.source, self.special_tokens = source, dict(special_tokens or {})
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse: {e}") from None

    @classmethod
    def from_checkpoint(cls, path: str) -> "ChatTemplate":
        """The template of tokenizer_config.json (a string, or a list of named ones: "default"),
        or chat_template.jinja beside it (newer checkpoints); NoChatTemplate if there is none."""
        config_path = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
        source = config.get("chat_template")
        if isinstance(source, list):
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        jinja_path = os.path.join(path, "chat_template.jinja")
        if source is None and os.path.exists(jinja_path):
            with open(jinja_path) as f:
                source = f.read()
        if not source:
            raise NoChatTemplate(f"{path} has no chat template (no chat_template in tokenizer_config.json, "
                                 f"no chat_template.jinja): use /v1/completions")
        special = {}
        for key in _SPECIAL:
            tok = config.get(key)
            special[key] = tok.get("content") if isinstance(tok, dict) else tok
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text; ValueError if the template rejects the messages (raise_exception)."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **extra})
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from None
