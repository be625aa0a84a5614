"""Chat templates render as transformers renders them (checked once against
transformers 5.24's apply_chat_template on the fixture: same text, same ids): the fixture's
Qwen-style template with its default system turn and raise_exception, the checkpoint layouts
that hold a template, and a clear error where there is none."""
import json
import os

import pytest
from tokenizers import Tokenizer

from tarragon_jax.model import byte_tokenizer
from tarragon_jax.serving.chat_template import ChatTemplate, NoChatTemplate

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "chat_tiny")


def test_fixture_template_text_and_ids():
    t = ChatTemplate.from_checkpoint(FIXTURE)
    msgs = [{"role": "user", "content": "Hi é 東京"}]
    text = t.render(msgs)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi é 東京<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(msgs, add_generation_prompt=False) == text[:-len("<|im_start|>assistant\n")]
    tok = Tokenizer.from_file(os.path.join(FIXTURE, "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.token_to_id("<|im_end|>")) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text                    # bytes round-trip
    with pytest.raises(ValueError, match="unknown role: robot"):
        t.render([{"role": "robot", "content": "x"}])


def test_template_sources(tmp_path):
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
        "bos_token": {"content": "<s>", "special": True}}))
    assert ChatTemplate.from_checkpoint(str(named)).render([{"role": "user", "content": "x"}]) == "<s>D"
    jinja = tmp_path / "jinja"
    jinja.mkdir()
    (jinja / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content | tojson }}]{% endfor %}")
    assert ChatTemplate.from_checkpoint(str(jinja)).render([{"role": "user", "content": "é"}]) == '["é"]'
    with pytest.raises(NoChatTemplate, match="no chat template"):
        ChatTemplate.from_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_byte_tokenizer_decodes_every_id_to_text():
    tok = byte_tokenizer.byte_tokenizer(512)
    assert tok.get_vocab_size() == 512 and tok.token_to_id(byte_tokenizer.EOS) == 511
    assert all(tok.decode([i]) for i in range(256, 509))              # merges: visible text
    text = "the rain in spain, naïve 東京"
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ValueError, match="byte tokenizer"):
        byte_tokenizer.byte_tokenizer(100)
