"""A byte-level tokenizer for models that come without one (the embedded `--model tiny`).

Every text encodes (256 byte tokens), so a random-weight model can still be served over the text
and chat APIs. The ids between the bytes and ChatML's three special tokens (at the end) are
merges of two frequent letters or a letter and a space, so every id the model can sample decodes
to visible text and a stream has a text delta per token, as with a real tokenizer.
"""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS = "<|im_end|>"                 # ends an assistant turn in ChatML
# ChatML, the layout of the Qwen families, as the chat template that ships with this tokenizer
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """256 byte tokens, then two-character merges, then SPECIAL: vocab_size ids in all."""
    n_merges = vocab_size - 256 - len(SPECIAL)
    pairs = [(a, b) for a in _LETTERS for b in "Ġ" + _LETTERS]      # "Ġ": a space, byte-level
    if not 0 <= n_merges <= len(pairs):
        raise ValueError(f"a byte tokenizer has {256 + len(SPECIAL)} to {256 + len(SPECIAL) + len(pairs)} ids, "
                         f"asked for {vocab_size}")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = pairs[:n_merges]
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL))
    return tok


def save(path: str, tokenizer: Tokenizer, chat_template: str = CHATML) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template; ChatML's end of
    turn as eos_token) as a Hugging Face checkpoint has them."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": chat_template, "eos_token": EOS, "bos_token": None,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)
