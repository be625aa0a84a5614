"""Train the demo model (`--model demo`): `python -m launch.train_demo --out tarragon_jax/model/demo`.

A small Qwen3-MoE (8 experts, top-2, about 2.3M parameters) trained with optax on text that ships
with Python itself, `pydoc_data.topics` (the help texts of the standard documentation; nothing to
download), with a byte-level BPE tokenizer trained on the same text by `tokenizers`. It writes a
Hugging Face checkpoint that the project's loader reads like any other: config.json,
model.safetensors (f16), generation_config.json, tokenizer.json, and tokenizer_config.json with
a ChatML chat template. Its routing is learnt, so experts are hot and cold as in a real MoE: the
per-expert share of routed tokens on held-out text is printed and written to --load_json.

The loss is the dense reference forward's (model/reference.py: every expert on every token, the
router's top-k weights as gates), so gradients reach the router through the gate weights, as in
the Hugging Face models; there is no auxiliary balancing loss.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "tarragon_jax", "model", "demo"), "Checkpoint directory to write.")
flags.DEFINE_integer("vocab_size", 2048, "BPE vocabulary (specials included).")
flags.DEFINE_integer("steps", 1200, "Optimizer steps.")
flags.DEFINE_integer("batch", 16, "Sequences per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (warmup, then cosine decay).")
flags.DEFINE_integer("seed", 0, "Initialization and batch order.")
flags.DEFINE_string("load_json", None, "Write the per-expert load on held-out text here.")

def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the pydoc topics in a fixed order, every 10th held out."""
    from pydoc_data import topics
    texts = [topics.topics[k] for k in sorted(topics.topics)]
    return [t for i, t in enumerate(texts) if i % 10], [t for i, t in enumerate(texts) if not i % 10]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tarragon_jax.model import byte_tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=FLAGS.vocab_size,
                                                       special_tokens=list(byte_tokenizer.SPECIAL),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def model_config():
    from tarragon_jax.config import tiny_model_config
    return tiny_model_config("qwen3_moe", vocab_size=FLAGS.vocab_size, d_model=128, n_layers=4, n_heads=4,
                             n_kv_heads=2, head_dim=32, n_experts=8, top_k=2, d_expert=128, max_position=1024)


def expert_load(cfg, params, ids) -> list[list[float]]:
    """Per MoE layer, each expert's share of the (token, k) choices on these token ids."""
    import numpy as np
    from tarragon_jax.model import reference
    shares = []
    for chosen_Txk in reference.expert_choices(cfg, params, ids):
        counts = np.bincount(np.asarray(chosen_Txk).ravel(), minlength=cfg.n_experts)
        shares.append((counts / counts.sum()).round(4).tolist())
    return shares


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tarragon_jax.model import byte_tokenizer, reference
    from tarragon_jax.model.hf_loader import save_checkpoint
    from tarragon_jax.model.tiny import random_params

    train_texts, held_out = corpus()
    tok = train_tokenizer(train_texts)
    eot = tok.token_to_id("<|endoftext|>")
    stream = np.concatenate([np.asarray(tok.encode(t).ids + [eot], np.int32) for t in train_texts])
    cfg = model_config()
    params = jax.tree.map(jnp.asarray, random_params(cfg, FLAGS.seed))
    params["attn"]["lm_head"] = params["attn"]["lm_head"] * 0.25       # start near uniform, not confident
    n_params = sum(a.size for a in jax.tree.leaves(params))
    print(f"{n_params / 1e6:.2f}M parameters, {len(stream)} training tokens, vocabulary {tok.get_vocab_size()}")

    warmup = min(50, FLAGS.steps // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, warmup, max(FLAGS.steps, warmup + 1), FLAGS.lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    state = opt.init(params)

    def loss_fn(p, batch_BxT):
        logits = jax.vmap(lambda ids: reference.forward(cfg, p, ids))(batch_BxT[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxT[:, 1:]).mean()

    @jax.jit
    def step(p, s, batch_BxT):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch_BxT)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(FLAGS.seed)
    t0 = time.perf_counter()
    for i in range(FLAGS.steps):
        starts = rng.integers(0, len(stream) - FLAGS.seq_len - 1, FLAGS.batch)
        batch = np.stack([stream[s:s + FLAGS.seq_len + 1] for s in starts])
        params, state, loss = step(params, state, batch)
        if i % 100 == 0 or i == FLAGS.steps - 1:
            print(f"step {i:5d}  loss {float(loss):.3f}  {time.perf_counter() - t0:.0f} s", flush=True)

    held = np.asarray(tok.encode("\n".join(held_out)).ids, np.int32)
    windows = [held[s:s + FLAGS.seq_len + 1] for s in range(0, len(held) - FLAGS.seq_len - 1, FLAGS.seq_len)][:64]
    print(f"held-out loss {float(loss_fn(params, jnp.asarray(np.stack(windows)))):.3f}")
    load = expert_load(cfg, params, jnp.asarray(held[:1024]))
    for layer, shares in enumerate(load):
        print(f"layer {layer} expert share: " + " ".join(f"{s:.2f}" for s in shares))

    os.makedirs(FLAGS.out, exist_ok=True)
    save_checkpoint(cfg, jax.tree.map(np.asarray, params), FLAGS.out, dtype=np.float16)
    with open(os.path.join(FLAGS.out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eot, tok.token_to_id(byte_tokenizer.EOS)]}, f, indent=1)
    byte_tokenizer.save(FLAGS.out, tok)                     # with the same ChatML template
    if FLAGS.load_json:
        with open(FLAGS.load_json, "w") as f:
            json.dump({"text": "pydoc_data.topics, held-out topics, first 1024 tokens", "top_k": cfg.top_k,
                       "share_per_layer": load, "steps": FLAGS.steps, "final_loss": float(loss)}, f, indent=1)
    print(f"wrote {FLAGS.out}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
