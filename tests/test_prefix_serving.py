"""Prefix caching in the engine: the same tokens with caching on and off (against the dense
reference), prefixes reused across requests and chat turns, placement on the AW holding the
prefix, an AW failure while requests share a prefix, and the /metrics counters."""
import numpy as np
import pytest

from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.model import reference
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.serving.prometheus_metrics import ServingMetrics
from seeding import fresh_rng

CACHE = CacheConfig(page_size=4, num_pages=128)


def _engine(cfg, params, caching, faults=(), **kw):
    conf = dict(num_attention_workers=2, num_expert_workers=3, prefill_chunk=8, max_step_tokens=32,
                prefix_caching=caching)
    conf.update(kw)
    return Engine(cfg, params, EngineConfig(**conf), CACHE, faults=FaultInjector.from_strings(faults))


def _hits(eng):
    return sum(aw.prefix_stats.hit_tokens for aw in eng.aws)


def _chat(eng, system, questions, sp, turns=2):
    """Each question its own conversation of `turns` turns, one after another: a turn's prompt is
    the last one + its answer + a follow-up. Returns every answer."""
    rng = np.random.default_rng(len(system))
    answers = []
    for q in questions:
        prompt = system + q
        for _ in range(turns):
            out = eng.generate([prompt], sp)[0]
            answers.append(out)
            prompt = prompt + out + rng.integers(3, 200, 3).tolist()
    return answers


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_caching_on_and_off_give_the_reference_tokens_across_requests_and_turns(family):
    rng = fresh_rng()
    cfg, params = tiny_model(family, seed=int(rng.integers(1 << 30)))
    system = rng.integers(3, cfg.vocab_size, 37).tolist()
    questions = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (2, 5, 9)]
    sp = SamplingParams(max_new_tokens=6)
    outs = {}
    for caching in (True, False):
        eng = _engine(cfg, params, caching)
        outs[caching] = _chat(eng, system, questions, sp)
        if caching:
            # a first turn reuses the 9 full blocks of the system prompt (none for the very first);
            # a second turn the full blocks of its first turn's prompt + answer (the last answer
            # token is never fed back): prompts of 39, 42, 46 tokens, answers of 6
            assert _hits(eng) == (0 + 44) + (36 + 44) + (36 + 48)
            assert sum(aw.prefix_stats.query_tokens for aw in eng.aws) > _hits(eng)
        else:
            assert _hits(eng) == 0 and all(aw.blocks.num_cached == 0 for aw in eng.aws)
        assert all(a.blocks.num_free == a.blocks.capacity for a in eng.aws)     # cached pages are free pages
        eng.close()
    assert outs[True] == outs[False]
    rng2 = np.random.default_rng(len(system))
    prompt = system + questions[0]
    assert outs[True][0] == reference.greedy_generate(cfg, params, prompt, 6)
    follow = prompt + outs[True][0] + rng2.integers(3, 200, 3).tolist()
    assert outs[True][1] == reference.greedy_generate(cfg, params, follow, 6)


def test_concurrent_sampled_requests_sharing_a_prefix_match_caching_off():
    rng = fresh_rng()
    cfg, params = tiny_model("qwen3_moe", seed=int(rng.integers(1 << 30)))
    system = rng.integers(3, cfg.vocab_size, 29).tolist()
    prompts = [system + rng.integers(3, cfg.vocab_size, n).tolist() for n in (1, 4, 7, 3, 12, 6)]
    sp = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=int(rng.integers(1 << 30)))
    outs = {}
    for caching in (True, False):
        eng = _engine(cfg, params, caching)
        ids = [eng.submit(prompts[0], sp)]
        for _ in range(6):                                 # the first one's prefill is cached by then
            eng.step()
        ids += [eng.submit(p, sp) for p in prompts[1:4]]
        eng.step()
        ids += [eng.submit(p, sp) for p in prompts[4:]]    # join while the others decode
        list(eng.stream())
        outs[caching] = [eng.requests[i].output for i in ids]
        if caching:
            assert _hits(eng) >= 28
        eng.close()
    assert outs[True] == outs[False]


def test_requests_with_a_cached_prefix_go_to_the_aw_holding_it():
    rng = fresh_rng()
    cfg, params = tiny_model("mixtral", seed=int(rng.integers(1 << 30)))
    system = rng.integers(3, cfg.vocab_size, 60).tolist()
    eng = _engine(cfg, params, True)
    sp = SamplingParams(max_new_tokens=3)
    eng.generate([rng.integers(3, cfg.vocab_size, 40).tolist()], sp)   # an unrelated request first
    for _ in range(4):                                     # one at a time: each finds the prefix cached
        eng.generate([system + rng.integers(3, cfg.vocab_size, 3).tolist()], sp)
    holders = [aw.index for aw in eng.aws if aw.prefix_stats.hit_tokens]
    assert len(holders) == 1 and eng.aws[holders[0]].prefix_stats.hit_tokens == 3 * 60
    eng.close()


def test_aw_failure_while_requests_share_a_prefix_keeps_the_tokens():
    """Five requests sharing a prefix run on AW1 (AW0 is busy with a long one), four of them took
    it from AW1's cache: their store copies are links to the first one's blocks. AW1 dies: on
    AW0 the moved requests restore from the store, a block they share written once, and the
    tokens are those of failure-free runs with caching on and off."""
    rng = fresh_rng()
    cfg, params = tiny_model("qwen3_moe", seed=int(rng.integers(1 << 30)))
    system = rng.integers(3, cfg.vocab_size, 33).tolist()
    prompts = [system + rng.integers(3, cfg.vocab_size, n).tolist() for n in (2, 5, 3, 8, 1)]
    long_one = rng.integers(3, cfg.vocab_size, 90).tolist()
    sp = SamplingParams(max_new_tokens=10)

    def run(caching, faults=()):
        eng = _engine(cfg, params, caching, faults, snapshot_interval_s=0)
        ids = [eng.submit(long_one, SamplingParams(max_new_tokens=40)), eng.submit(prompts[0], sp)]
        while eng.requests[ids[1]].num_cached < 33:
            eng.step()
        ids += [eng.submit(p, sp) for p in prompts[1:]]
        if caching:
            assert [len(aw.live_requests()) for aw in eng.aws] == [1, 5]
        while eng.has_work:
            eng.controller.store.wait()                    # every filled block committed before the fault
            eng.step()
        eng.controller.wait_recoveries()
        return [eng.requests[i].output for i in ids], eng

    clean, eng = run(False)
    sent_off = eng.controller.store.stats["blocks"]
    eng.close()
    cached, eng = run(True)
    store = eng.controller.store.stats
    assert store["blocks"] == store["saved_blocks"] <= sent_off - 4 * 8   # the shared prefix: sent and written once
    eng.close()
    failed, eng = run(True, ["aw:1@step=10"])
    rec = eng.controller.records[0]
    assert rec.kind == "aw" and rec.requests_moved == 5
    restored = eng.aws[0].restored
    assert restored.requests == 5 and restored.fallbacks == 0
    assert restored.shared >= 4 * 8                        # 8 prefix blocks written once, shared by 4
    assert restored.tokens_recomputed < 5 * 4              # each recomputes its tail past its last full block
    assert failed == cached == clean
    eng.close()


def test_metrics_count_prefix_cache_hits():
    rng = fresh_rng()
    cfg, params = tiny_model("qwen2_moe", seed=int(rng.integers(1 << 30)))
    system = rng.integers(3, cfg.vocab_size, 24).tolist()
    eng = _engine(cfg, params, True, num_attention_workers=1)
    metrics = ServingMetrics()
    sp = SamplingParams(max_new_tokens=2)
    for n in (3, 4):
        eng.generate([system + [5] * n], sp)
        metrics.refresh(eng)
    text = metrics.exposition().decode()

    def value(name):
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))
    assert value("tarragon_prefix_cache_queries_total") == 24 + 3 + 24 + 4
    assert value("tarragon_prefix_cache_hit_tokens_total") == 24
    assert value('tarragon_prefix_cache_blocks{worker="aw0"}') >= 6
    eng.close()


def _holder_dies(seed, caching, replacement_first):
    """Request 0 computes a 41-token prefix on AW0; request 1 with it goes to idle AW1 (AW0 is
    busier than the prefix is worth); AW0 is killed; request 2 with the prefix is sent before
    AW0's replacement joins (onto AW1) or after (onto the replacement: AW1 is busier). Returns
    the outputs, where the requests were after the last submit (sorted per AW) and the engine."""
    rng = np.random.default_rng(seed)
    cfg, params = tiny_model("qwen2_moe", seed=int(rng.integers(1 << 30)))
    system = rng.integers(3, cfg.vocab_size, 41).tolist()
    prompts = [system + rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 2, 5)]
    sp = SamplingParams(max_new_tokens=30)
    eng = _engine(cfg, params, caching, snapshot_interval_s=0)
    ids = [eng.submit(prompts[0], sp)]
    while eng.requests[ids[0]].num_cached < len(prompts[0]):
        eng.step()
    eng.controller.store.wait()
    ids.append(eng.submit(prompts[1], sp))
    for _ in range(3):
        eng.step()
    eng.controller.store.wait()
    eng.controller.kill("aw0")
    eng.step()
    if replacement_first:
        eng.controller.wait_recoveries()                   # the replacement AW0 joins, its cache empty
    ids.append(eng.submit(prompts[2], sp))
    placed = [sorted(s.request_id for s in aw.live_requests()) for aw in eng.aws]
    list(eng.stream())
    eng.controller.wait_recoveries()
    return [eng.requests[i].output for i in ids], placed, eng


@pytest.mark.parametrize("replacement_first", [False, True])
def test_a_prefix_another_aw_computed_is_read_from_the_store(replacement_first):
    """AW1 reads request 1's prefix from the store (AW0's request snapshotted it) instead of
    computing it. AW0 dies and its request moves to AW1, which holds the prefix already; a later
    request with it finds it there, or, sent to AW0's replacement, reads it from the store too.
    Tokens as with caching off throughout."""
    seed = int(fresh_rng().integers(1 << 30))
    off, _, eng = _holder_dies(seed, False, replacement_first)
    eng.close()
    on, placed, eng = _holder_dies(seed, True, replacement_first)
    assert on == off
    aw1 = eng.aws[1].prefix_stats
    assert aw1.store_hit_tokens == 40                     # request 1's prefix came from the store
    assert eng.aws[1].restored.requests == 1 and eng.aws[1].restored.fallbacks == 0
    if replacement_first:
        assert placed == [[2], [0, 1]] and eng.aws[0].prefix_stats.store_hit_tokens == 40
    else:
        assert aw1.hit_tokens == 3 * 40                   # requests 0 (moved) and 2 found it cached
    eng.close()


def test_cached_blocks_are_the_bits_a_recompute_gives_in_the_same_bucket():
    """With chunks of one block (prefill_chunk = page_size, every step in the smallest token
    bucket), a request that takes 3 blocks from the cache and computes 2 holds exactly the bits
    of the same prompt computed from scratch without caching. A block's bits depend on its tokens
    and on the step's token bucket (XLA's row results on CPU depend on the row count), never on
    where a chunk started or whether the prefix came from the cache."""
    rng = fresh_rng()
    cfg, params = tiny_model("qwen3_moe", seed=int(rng.integers(1 << 30)))
    prompt = rng.integers(3, cfg.vocab_size, 41).tolist()
    cache = CacheConfig(page_size=8, num_pages=32)

    def kv(caching, warm=None):
        eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2, prefill_chunk=8,
                                               max_step_tokens=8, prefix_caching=caching), cache)
        if warm is not None:
            eng.generate([warm], SamplingParams(max_new_tokens=2))      # computes and caches the prefix
        rid = eng.submit(prompt, SamplingParams(max_new_tokens=8))
        aw = eng.aws[0]
        while eng.requests[rid].num_cached < 40:
            eng.step()
        pages = aw.blocks.block_table(rid)[:5]
        out = [np.asarray(aw.pages[layer][part])[pages] for layer in range(cfg.n_layers) for part in sorted(aw.pages[layer])]
        hits = aw.prefix_stats.hit_tokens
        eng.close()
        return out, hits

    fresh, _ = kv(False)
    shared, hits = kv(True, warm=prompt[:24] + rng.integers(3, cfg.vocab_size, 5).tolist())
    assert hits == 24
    assert all(np.array_equal(a, b) for a, b in zip(fresh, shared))
