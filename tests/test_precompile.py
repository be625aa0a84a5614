"""--precompile: the shape grid covers every shape serving meets (no stage program compiles
after startup, with requests of mixed lengths arriving mid-run), and precompiling, which runs
every program on zeros through the sink page, leaves the tokens exactly the reference's."""
import dataclasses
import threading

import jax
import numpy as np
import pytest
from jax._src import dispatch, monitoring

from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.kv import kv_cache
from tarragon_jax.model import attention_stage, expert_stage, reference, sampling
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.shape_grid import buckets, shape_grid
from seeding import fresh_rng

PROGRAMS = (attention_stage.embed, attention_stage.attention_layer, attention_stage.head, sampling.sample, sampling.adjust,
            kv_cache.read_blocks, kv_cache.write_blocks, expert_stage.expert_layer)


def test_buckets_cover_every_count():
    assert buckets(8, 256) == (8, 16, 32, 64, 128, 256)
    assert buckets(4, 40) == (4, 8, 16, 32, 64) and buckets(1, 1) == (1,) and buckets(8, 3) == (8,)


def test_grid_matches_the_configs():
    cfg, _ = tiny_model("mixtral", max_position=64)
    grid = shape_grid(cfg, CacheConfig(page_size=4, num_pages=40),
                      EngineConfig(max_step_tokens=16, prefill_chunk=8, max_running=4))
    assert grid.tokens == (8, 16) and grid.pages == (1, 2, 4, 8, 16) and grid.rows == (4,)
    assert grid.senders == (1, 2) and grid.entries == (64, 256, 1024)       # 64 positions + 300 bias tokens


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])   # deepseek: dense and MoE layers
def test_nothing_compiles_after_precompile_and_tokens_match_reference(family):
    rng = fresh_rng()
    cfg, params = tiny_model(family, seed=int(rng.integers(1 << 30)), max_position=64)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=2, max_step_tokens=16,
                                           prefill_chunk=8, max_running=4, precompile="all"),
                 CacheConfig(page_size=4, num_pages=40))
    assert eng.controller.precompile_s > 0
    compiled = [f._cache_size() for f in PROGRAMS]
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 17, 9, 30, 1, 12)]
    sps = [SamplingParams(max_new_tokens=20)] * 5 + [SamplingParams(max_new_tokens=20, repetition_penalty=1.5,
                                                                    logit_bias=((7, 2.0),))]   # a late one adjusts
    ids = [eng.submit(p, sp) for p, sp in zip(prompts[:3], sps)]
    for _ in range(4):
        eng.step()
    ids += [eng.submit(p, sp) for p, sp in zip(prompts[3:], sps[3:])]
    list(eng.stream())
    assert [f._cache_size() for f in PROGRAMS] == compiled
    for rid, p, sp in zip(ids, prompts, sps):
        assert eng.requests[rid].output == reference.greedy_generate(cfg, params, p, 20, sp)
    eng.close()


def test_recovery_precompile_pads_every_step_to_a_compiled_bucket():
    """--precompile recovery compiles two token buckets (at every table width and row count) and
    the restore writes at every block count. Every step pads up to a compiled bucket, so nothing
    compiles on the serving thread after startup: not the normal steps, whose exact bucket was
    never compiled, nor those of the AW failure's recovery. Tokens stay the reference's."""
    rng = fresh_rng()
    cfg, params = tiny_model("qwen2_moe", seed=int(rng.integers(1 << 30)), max_position=64)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=2, max_step_tokens=32,
                                           prefill_chunk=8, max_running=4, precompile="recovery"),
                 CacheConfig(page_size=4, num_pages=40))
    assert eng.controller.grid.tokens == (8, 32)              # 16 is never compiled: those steps pad to 32
    compiles = []           # on the serving thread (the replacement AW compiles in the background)
    listener = lambda event, secs, **kw: (event == dispatch.BACKEND_COMPILE_EVENT and threading.current_thread()
                                          is threading.main_thread() and compiles.append(kw.get("fun_name")))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ids = [eng.submit(rng.integers(3, cfg.vocab_size, n).tolist(), SamplingParams(max_new_tokens=16))
               for n in (3, 17, 9, 5)]
        for _ in range(8):
            eng.step()
        eng.controller.store.wait()
        eng.controller.kill("aw0")
        recomputing = 0
        while eng.has_work:
            before = sum(a.restored.recompute_steps for a in eng.aws)
            eng.step()
            recomputing += sum(a.restored.recompute_steps for a in eng.aws) > before
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert recomputing >= 1 and eng.aws[1].restored.requests > 0
    for rid in ids:
        prompt = eng.requests[rid].prompt
        assert eng.requests[rid].output == reference.greedy_generate(cfg, params, prompt, 16)
    eng.close()


def test_fit_tokens_pads_up_to_the_smallest_compiled_bucket():
    cfg, _ = tiny_model("mixtral", max_position=64)
    grid = shape_grid(cfg, CacheConfig(page_size=4, num_pages=40),
                      EngineConfig(max_step_tokens=64, prefill_chunk=8, max_running=4))
    sparse = dataclasses.replace(grid, tokens=(8, 64))
    assert [sparse.fit_tokens(t) for t in (8, 16, 32, 64)] == [8, 64, 64, 64]
    assert [grid.fit_tokens(t) for t in (8, 16, 32)] == [8, 16, 32]
    assert sparse.fit_tokens(128) == 128                     # beyond the grid: its own bucket
