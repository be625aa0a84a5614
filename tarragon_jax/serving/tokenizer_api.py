"""The tokenizer endpoints of vLLM's server: POST /tokenize, POST /detokenize, GET
/tokenizer_info. Clients that count or split tokens the way the server does use them:
lm-evaluation-harness's local-completions tokenizes through them (its "remote" tokenizer), so
scoring loglikelihoods needs no local copy of the tokenizer."""
from __future__ import annotations

from tarragon_jax.serving import openai_api


def _needs(tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (tokenizer.json in the checkpoint)")


def info(tokenizer, eos_ids: tuple, template, max_model_len: int) -> dict:
    _needs(tokenizer)
    eos = tokenizer.id_to_token(eos_ids[0]) if eos_ids else None
    return {"eos_token": eos, "bos_token": None, "pad_token": None, "model_max_length": max_model_len,
            "chat_template": template.source if template is not None else None, "vocab_size": tokenizer.get_vocab_size()}


def tokenize(body, tokenizer, template, max_model_len: int) -> dict:
    """{"prompt": text, "add_special_tokens"} or {"messages": [...], "add_generation_prompt"} ->
    {"tokens", "count", "max_model_len"}; ValueError names what is wrong."""
    _needs(tokenizer)
    if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
        raise ValueError('give exactly one of "prompt" (text) or "messages" (a chat)')
    add = body.get("add_special_tokens", True)
    if not isinstance(add, bool):
        raise ValueError('"add_special_tokens" must be true or false')
    if "messages" in body:
        tokens = openai_api.render_chat(body, tokenizer, template, body.get("tools") or None)
    elif not isinstance(body["prompt"], str):
        raise ValueError('"prompt" must be a string')
    else:
        tokens = tokenizer.encode(body["prompt"], add_special_tokens=add).ids
    return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}


def detokenize(body, tokenizer) -> dict:
    _needs(tokenizer)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < tokenizer.get_vocab_size() for t in tokens):
        raise ValueError(f'"tokens" must be a list of token ids in [0, {tokenizer.get_vocab_size()})')
    return {"prompt": tokenizer.decode(tokens, skip_special_tokens=False)}
