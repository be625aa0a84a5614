"""A byte-level tokenizer for models that come without one (the embedded `--model tiny`).

Every text encodes (256 byte tokens, no merges), so a random-weight model can still be served
over the text and chat APIs; ChatML's markers are special tokens, and the rest of the vocabulary
is filled with reserved special tokens, so every id the model can sample decodes (to nothing).
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


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """256 byte tokens, then SPECIAL, then reserved tokens up to vocab_size ids."""
    if vocab_size < 256 + len(SPECIAL):
        raise ValueError(f"a byte tokenizer needs a vocabulary of at least {256 + len(SPECIAL)}, got {vocab_size}")
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL) + [f"<|reserved_{i}|>" for i in range(vocab_size - 256 - len(SPECIAL))])
    return tok


def save(path: str, vocab_size: int, chat_template: str = CHATML) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) as a Hugging Face
    checkpoint has them."""
    os.makedirs(path, exist_ok=True)
    byte_tokenizer(vocab_size).save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": chat_template, "eos_token": EOS, "bos_token": None,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)
