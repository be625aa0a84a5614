"""--precompile: the shape grid covers every shape serving meets (no stage program compiles
after startup, with requests of mixed lengths arriving mid-run), and precompiling, which runs
every program on zeros through the sink page, leaves the tokens exactly the reference's."""
import numpy as np
import pytest

from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.kv import kv_cache
from tarragon_jax.model import attention_stage, expert_stage, reference
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.shape_grid import buckets, shape_grid

PROGRAMS = (attention_stage.embed, attention_stage.attention_layer, attention_stage.head,
            kv_cache.read_blocks, kv_cache.write_blocks, expert_stage.expert_layer)


def test_buckets_cover_every_count():
    assert buckets(8, 256) == (8, 16, 32, 64, 128, 256)
    assert buckets(4, 40) == (4, 8, 16, 32, 64) and buckets(1, 1) == (1,) and buckets(8, 3) == (8,)


def test_grid_matches_the_configs():
    cfg, _ = tiny_model("mixtral", max_position=64)
    grid = shape_grid(cfg, CacheConfig(page_size=4, num_pages=40),
                      EngineConfig(max_step_tokens=16, prefill_chunk=8, max_running=4))
    assert grid.tokens == (8, 16) and grid.pages == (1, 2, 4, 8, 16) and grid.rows == (4,)
    assert grid.senders == (1, 2)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])   # deepseek: dense and MoE layers
def test_nothing_compiles_after_precompile_and_tokens_match_reference(family):
    rng = np.random.default_rng()
    cfg, params = tiny_model(family, seed=int(rng.integers(1 << 30)), max_position=64)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=2, max_step_tokens=16,
                                           prefill_chunk=8, max_running=4, precompile="all"),
                 CacheConfig(page_size=4, num_pages=40))
    assert eng.controller.precompile_s > 0
    compiled = [f._cache_size() for f in PROGRAMS]
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 17, 9, 30, 1, 12)]
    sp = SamplingParams(max_new_tokens=20)
    ids = [eng.submit(p, sp) for p in prompts[:3]]
    for _ in range(4):
        eng.step()
    ids += [eng.submit(p, sp) for p in prompts[3:]]
    list(eng.stream())
    assert [f._cache_size() for f in PROGRAMS] == compiled
    for rid, p in zip(ids, prompts):
        assert eng.requests[rid].output == reference.greedy_generate(cfg, params, p, 20)
    eng.close()
