"""The dummy load format: the shipped real-model configs parse, and weights built from a
config.json alone have exactly the layout and shapes a checkpoint of it loads with, and serve."""
import os

import jax
import numpy as np
import pytest

from tarragon_jax.config import EngineConfig, SamplingParams
from tarragon_jax.model.dummy import DummyWeights, dummy_checkpoint, read_config
from tarragon_jax.model.hf_loader import load_checkpoint
from tarragon_jax.model.weights import sizes
from tarragon_jax.serving.engine import Engine
from seeding import fresh_rng

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "launch", "configs")


@pytest.mark.parametrize("name, params_b, experts, top_k", [("qwen3_30b_a3b", 30.5, 128, 8),
                                                            ("mixtral_8x7b", 46.7, 8, 2),
                                                            ("qwen1.5_moe_a2.7b", 14.3, 60, 4),
                                                            ("glm4.5_air", 106, 128, 8),
                                                            ("deepseek_v2_lite", 15.7, 64, 6),
                                                            ("qwen3_30b_a3b_fp8", 30.5, 128, 8)])
def test_shipped_configs_parse_at_their_published_sizes(name, params_b, experts, top_k):
    cfg = read_config(os.path.join(CONFIGS, name))
    n = sum(jax.tree.leaves(sizes(cfg)))
    assert cfg.n_experts == experts and cfg.top_k == top_k
    assert abs(n / 1e9 - params_b) / params_b < 0.01


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_dummy_weights_have_the_checkpoint_layout_and_serve(family):
    path = os.path.join(HERE, "fixtures", family)
    cfg, real = load_checkpoint(path)
    dcfg, dummy = dummy_checkpoint(path, np.float32, seed=1)
    assert dcfg == cfg
    assert jax.tree.structure(dummy) == jax.tree.structure(real)
    assert [a.shape for a in jax.tree.leaves(dummy)] == [a.shape for a in jax.tree.leaves(real)]
    leaves = jax.tree.leaves(dummy)
    assert all(np.isfinite(a).all() for a in leaves) and len({a.tobytes()[:64] for a in leaves if a.size > 64}) > 3
    eng = Engine(dcfg, dummy, EngineConfig(num_attention_workers=2, num_expert_workers=2))
    out = eng.generate([[5, 6, 7], [9, 10]], SamplingParams(max_new_tokens=4))
    assert [len(o) for o in out] == [4, 4]
    eng.close()


def test_an_expert_worker_makes_only_its_rows_and_they_are_the_whole_models():
    """DummyWeights: the rows of any experts equal the same rows of the whole model; the object a
    worker process gets is the recipe (config and seed), not the tensors."""
    import pickle
    path = os.path.join(CONFIGS, "qwen3_30b_a3b")        # 30B at real shapes: never made whole here
    w = DummyWeights(path, np.float32, seed=int(fresh_rng().integers(100)))
    assert len(pickle.dumps(w)) < 1 << 20
    small = os.path.join(HERE, "fixtures", "qwen3_moe")
    ws = DummyWeights(small, np.float32, seed=3)
    whole = ws.load()
    ids = [int(j) for j in fresh_rng().choice(ws.config.n_experts, 3, replace=False)]
    for k, a in ws.experts(1, ids).items():
        np.testing.assert_array_equal(a, whole["experts"][1][k][ids])
    big = w.experts(0, [5, 77])
    assert big["w_gate"].shape == (2, w.config.d_model, w.config.d_expert) and np.isfinite(big["w_down"]).all()
