"""The disaggregated engine (2 AWs x 4 EWs on distinct simulated devices) against the dense
single-device reference forward, with requests arriving while others run."""
import jax.numpy as jnp
import numpy as np
import pytest

from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from seeding import fresh_rng


def _prompts(rng, vocab, lengths):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("family, backend, attention, pingpong", [("qwen2_moe", "ragged_dot", "jnp", False),
                                                                  ("mixtral", "dense", "auto", False),
                                                                  ("qwen3_moe", "pallas", "pallas", False),
                                                                  ("deepseek_v3", "tiles", "auto", True)])
def test_engine_token_identical_to_reference_with_midrun_arrivals(family, backend, attention, pingpong):
    rng = fresh_rng()
    cfg, params = tiny_model(family, seed=int(rng.integers(1 << 30)))
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4,
                                           expert_backend=backend, attention_backend=attention,
                                           prefill_chunk=8, max_step_tokens=24, pingpong=pingpong),
                 CacheConfig(page_size=4, num_pages=64))
    first = _prompts(rng, cfg.vocab_size, [3, 19, 6])
    late = _prompts(rng, cfg.vocab_size, [11, 2])
    sp = SamplingParams(max_new_tokens=7)
    ids = [eng.submit(p, sp) for p in first]
    assert {a.handle.devices for a in eng.aws}.isdisjoint({e.handle.devices for e in eng.ews})
    events = [e for _ in range(3) for e in eng.step()]
    ids += [eng.submit(p, sp) for p in late]             # join the running batch mid-run
    events += list(eng.stream())
    for rid, prompt in zip(ids, first + late):
        want = reference.greedy_generate(cfg, params, prompt, 7)
        assert eng.requests[rid].output == want
        assert [e.token for e in events if e.request_id == rid] == want     # every token emitted once, in order
    assert all(a.blocks.num_free == a.blocks.capacity for a in eng.aws)   # every page returned


def test_requests_queue_when_pages_run_out():
    cfg, params = tiny_model("qwen2_moe")
    # one AW with room for a single request at a time: the others wait, none is corrupted
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2, prefill_chunk=16),
                 CacheConfig(page_size=4, num_pages=5))
    rng = fresh_rng()
    prompts = _prompts(rng, cfg.vocab_size, [9, 5, 7])
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=6))
    for p, o in zip(prompts, outs):
        assert o == reference.greedy_generate(cfg, params, p, 6)


def test_stop_tokens_and_length_cap():
    cfg, params = tiny_model("qwen2_moe", max_position=24)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=2))
    prompt = [5, 6, 7, 8]
    full = reference.greedy_generate(cfg, params, prompt, 6)
    rid = eng.submit(prompt, SamplingParams(max_new_tokens=6, stop_token_ids=(full[2],)))
    cap = eng.submit(list(range(3, 23)), SamplingParams(max_new_tokens=50))
    events = list(eng.stream())
    assert eng.requests[rid].output == full[:full.index(full[2]) + 1]
    assert eng.requests[rid].finish_reason == "stop"
    assert len(eng.requests[cap].output) == 4 and eng.requests[cap].finish_reason == "length"
    assert [e.finished for e in events if e.request_id == cap] == [False] * 3 + [True]


def test_metrics_record_ttft_and_every_gap():
    cfg, params = tiny_model("qwen3_moe")
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4))
    rid = eng.submit([9, 8, 7], SamplingParams(max_new_tokens=5))
    list(eng.stream())
    t = eng.metrics.requests[rid]
    assert t.ttft_s > 0 and len(t.gaps_s) == 4 and all(g >= 0 for g in t.gaps_s)
    assert eng.metrics.throughput() > 0


def test_cancel_running_and_queued_requests():
    """Cancelled requests free their pages at once and emit nothing more; the others are untouched."""
    rng = fresh_rng()
    cfg, params = tiny_model("mixtral", seed=int(rng.integers(1 << 30)))
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=2, max_running=1,
                                           prefill_chunk=8, max_step_tokens=16),
                 CacheConfig(page_size=4, num_pages=64))
    prompts = _prompts(rng, cfg.vocab_size, [5, 9, 4, 6])
    sp = SamplingParams(max_new_tokens=10)
    ids = [eng.submit(p, sp) for p in prompts]        # one running per AW, one queued per AW
    for _ in range(3):
        eng.step()
    running, queued = ids[0], ids[3]
    assert eng.requests[running].state.value == "running" and eng.requests[queued].state.value == "waiting"
    assert eng.cancel(running) and eng.cancel(queued) and not eng.cancel(queued) and not eng.cancel(99)
    n_out = len(eng.requests[running].output)
    events = list(eng.stream())
    assert not {e.request_id for e in events} & {running, queued}
    assert len(eng.requests[running].output) == n_out and eng.requests[running].finish_reason == "cancelled"
    for rid in (ids[1], ids[2]):
        assert eng.requests[rid].output == reference.greedy_generate(cfg, params, prompts[rid], 10)
    assert all(a.blocks.num_free == a.blocks.capacity for a in eng.aws)
    eng.close()


def test_mla_latent_cache_decodes_like_the_per_head_cache():
    """DeepSeek MLA: caching one latent row per token (queries absorb the up-projections) gives
    the tokens of caching K/V per head, in pages 2 x heads x head_dim / (kv_lora + rope) smaller."""
    import dataclasses
    cfg, params = tiny_model("deepseek_v3", seed=int(fresh_rng().integers(1 << 20)))
    rng = fresh_rng()
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (6, 11, 3)]
    outs, pages = {}, {}
    for latent in (True, False):
        eng = Engine(dataclasses.replace(cfg, mla_latent_cache=latent), params,
                     EngineConfig(num_attention_workers=2, num_expert_workers=2, prefill_chunk=4),
                     CacheConfig(page_size=4, num_pages=32))
        outs[latent] = eng.generate(prompts, SamplingParams(max_new_tokens=10))
        pages[latent] = {k: v.shape for k, v in eng.aws[0].pages[0].items()}
        eng.close()
    assert outs[True] == outs[False] == [reference.greedy_generate(cfg, params, p, 10) for p in prompts]
    assert pages[True] == {"k": (32, 4, 1, cfg.kv_lora_rank + cfg.qk_rope_dim)}
    assert pages[False] == {"k": (32, 4, cfg.n_heads, cfg.head_dim), "v": (32, 4, cfg.n_heads, cfg.head_dim)}


def test_bf16_serving_keeps_a_sigmoid_router_in_f32():
    """As transformers does for DeepSeek: the routing scores decide experts, bf16 would move them."""
    cfg, params = tiny_model("deepseek_v3", seed=1)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2, dtype="bfloat16"),
                 CacheConfig(page_size=4, num_pages=16))
    lp = eng.aws[0].params["layers"][1]
    assert lp["router"].dtype == np.float32 and lp["router_bias"].dtype == np.float32
    assert lp["wq_a"].dtype == jnp.bfloat16 and eng.aws[0].pages[0]["k"].dtype == jnp.bfloat16
    assert len(eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))[0]) == 4
    eng.close()
