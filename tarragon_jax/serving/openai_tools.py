"""Tool calls in chat completions: `tools` and `tool_choice`, as OpenAI clients send them.

The tools reach the model through the checkpoint's chat template (its `tools` variable, as
transformers' apply_chat_template passes them). What the model answers becomes `tool_calls`:
- a named function (`tool_choice: {"type": "function", "function": {"name"}}`): the answer is
  that function's arguments, constrained to its `parameters` schema (workers/grammar.py), and a
  stream sends them as they come, as OpenAI's tool_calls deltas;
- "required": a JSON list of one or more {"name", "parameters"} calls, constrained to the
  tools' schemas (vLLM builds the same list schema);
- "auto": the model decides; calls written as Hermes-style `<tool_call>{"name", "arguments"}
  </tool_call>` blocks (the format of Qwen's and Hermes' templates) are parsed out of the text;
- "none": the tools are shown to the model and nothing is parsed.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid

from tarragon_jax.workers.grammar import json_grammar

_HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: str                       # "none", "auto", "required" or "named"
    name: str | None = None         # the named function


def parse(body: dict) -> tuple[list | None, ToolChoice, str | None]:
    """(tools for the chat template, or None; the choice; the grammar the answer follows, or
    None); ValueError names what is wrong."""
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"]
            and isinstance(t["function"].get("parameters", {}), dict) for t in tools):
        raise ValueError('"tools" must be a list of {"type": "function", "function": {"name": ..., '
                         '"parameters": {JSON schema}}}')
    functions = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in functions:
            raise ValueError(f'"tool_choice" names {name!r}, which is not one of the "tools" {sorted(functions)}')
        return tools, ToolChoice("named", name), json_grammar(functions[name])
    if choice not in ("none", "auto", "required"):
        raise ValueError('"tool_choice" must be "none", "auto", "required" or {"type": "function", '
                         '"function": {"name": ...}}')
    if choice != "none" and not tools:
        raise ValueError(f'"tool_choice": "{choice}" needs "tools"')
    if choice == "required":
        calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                            "required": ["name", "parameters"], "additionalProperties": False}
                           for n, p in functions.items()]}
        return tools, ToolChoice("required"), json_grammar({"type": "array", "minItems": 1, "items": calls})
    return tools or None, ToolChoice(choice), None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments, id_: str | None = None) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id_ or call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def argument_delta(choice: ToolChoice, id_: str, text: str, first: bool) -> dict:
    """A stream's tool_calls entry for more of a named call's arguments (the first also names it)."""
    if first:
        return {"index": 0, "id": id_, "type": "function", "function": {"name": choice.name, "arguments": text}}
    return {"index": 0, "function": {"arguments": text}}


def calls(choice: ToolChoice, text: str, id_: str | None = None) -> tuple[str | None, list | None]:
    """(message content, tool_calls) of a finished answer: tool_calls None when there are none
    (then the content is the text). id_: the named call's id (its stream's)."""
    if choice.mode == "named":
        return None, [_call(choice.name, text, id_)]
    if choice.mode == "required":
        try:
            return None, [_call(c["name"], c["parameters"]) for c in json.loads(text)]
        except (json.JSONDecodeError, KeyError, TypeError):   # cut short by max_tokens
            return text, None
    if choice.mode == "auto":
        found = []
        for block in _HERMES.findall(text):
            try:
                call = json.loads(block)
                found.append(_call(call["name"], call.get("arguments", {})))
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, None                             # not a well-formed call: plain text
        if found:
            return _HERMES.sub("", text).strip() or None, found
    return text, None
