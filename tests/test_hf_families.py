"""Each family against transformers on the same checkpoint (fixtures from make_fixtures.py)."""
import json
import os
import shutil

import numpy as np
import pytest

from tarragon_jax.config import ConfigError, EngineConfig, SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.model.hf_loader import CheckpointError, load_checkpoint
from tarragon_jax.serving.engine import Engine
from seeding import fresh_rng

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_bf16", "qwen3_moe_fp8", "deepseek_v2", "deepseek_v3",
            "deepseek_v3_yarn", "glm4_moe"]


def _expected(name):
    with open(os.path.join(FIX, name, "expected.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_matches_transformers_logits_and_greedy(name):
    cfg, params = load_checkpoint(os.path.join(FIX, name))
    exp = _expected(name)
    for prompt, want_logits, want_tokens in zip(exp["prompts"], exp["last_logits"], exp["greedy_new_tokens"]):
        logits = np.asarray(reference.forward(cfg, params, np.asarray(prompt, np.int32)))[-1]
        want = np.asarray(want_logits, np.float32)
        # 1e-4 relative to the logit scale (transformers computes in f32 with another op order)
        assert np.max(np.abs(logits - want)) <= 1e-4 * np.max(np.abs(want)), name
        assert reference.greedy_generate(cfg, params, prompt, len(want_tokens)) == want_tokens


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_fp8", "deepseek_v2", "deepseek_v3",
                                  "deepseek_v3_yarn", "glm4_moe"])
def test_engine_matches_transformers_greedy(name):
    cfg, params = load_checkpoint(os.path.join(FIX, name))
    exp = _expected(name)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4, prefill_chunk=16))
    outs = eng.generate(exp["prompts"], SamplingParams(max_new_tokens=len(exp["greedy_new_tokens"][0])))
    assert outs == exp["greedy_new_tokens"]


def test_bf16_weights_load_as_requested_dtype():
    cfg, p16 = load_checkpoint(os.path.join(FIX, "qwen3_moe_bf16"))
    _, p32 = load_checkpoint(os.path.join(FIX, "qwen3_moe"))
    assert p16["attn"]["embed"].dtype == np.float32
    np.testing.assert_allclose(p16["attn"]["embed"], p32["attn"]["embed"], rtol=1e-2, atol=1e-2)
    _, pb = load_checkpoint(os.path.join(FIX, "qwen3_moe_bf16"), dtype=np.float16)
    assert pb["experts"][0]["w_gate"].dtype == np.float16 and pb["experts"][0]["w_gate"].shape == (8, 64, 32)


def _copy(tmp_path, name="qwen2_moe"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIX, name), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(path, fn):
    from safetensors.numpy import load_file, save_file
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(str(tmp_path))


def test_no_weights(tmp_path):
    d = _copy(tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors"):
        load_checkpoint(str(d))


def test_missing_shard(tmp_path):
    d = _copy(tmp_path, "mixtral")
    os.remove(d / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_checkpoint(str(d))


def test_unknown_family(tmp_path):
    d = _copy(tmp_path)
    _edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ConfigError, match="unknown model family.*LlamaForCausalLM"):
        load_checkpoint(str(d))


def test_missing_and_misshaped_and_extra_tensors(tmp_path):
    d = _copy(tmp_path)
    _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"):
        load_checkpoint(str(d))
    d = _copy(tmp_path / "b")
    _rewrite_tensors(d, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(63,\), expected \(64,\)"):
        load_checkpoint(str(d))
    d = _copy(tmp_path / "c")
    _rewrite_tensors(d, lambda t: t.update({"model.layers.0.mlp.mystery.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensors.*mystery"):
        load_checkpoint(str(d))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_save_checkpoint_round_trips(tmp_path, family):
    from tarragon_jax.model.hf_loader import save_checkpoint
    from tarragon_jax.model.tiny import tiny_model
    import jax
    cfg, params = tiny_model(family, seed=int(fresh_rng().integers(1000)))
    save_checkpoint(cfg, params, str(tmp_path))
    cfg2, params2 = load_checkpoint(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("name, change, field", [
    ("qwen2_moe", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2_moe", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "longrope"),
    ("qwen2_moe", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "original_max_position"),
    ("qwen2_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
    ("qwen2_moe", dict(vocab_size=None), "vocab_size"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    ("deepseek_v3", dict(topk_method="greedy"), "topk_method"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias"),
    ("deepseek_v3", dict(n_group=3), "n_group=3 must divide"),
    ("deepseek_v3", dict(first_k_dense_replace=3), "first_k_dense=3 must leave an MoE layer"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method='noaux_tc' for deepseek_v2"),
    ("deepseek_v2", dict(scoring_func="sigmoid"), "scoring_func='sigmoid' for deepseek_v2"),
    ("deepseek_v2", dict(moe_layer_freq=2), "moe_layer_freq"),
    ("qwen3_moe", dict(quantization_config={"quant_method": "fp8"}), "weight_block_size=None"),
    ("qwen3_moe", dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128],
                                            "activation_scheme": "static"}), "activation_scheme='static'"),
    ("qwen3_moe", dict(quantization_config={"quant_method": "mxfp4"}), "quantization_config \\(quant_method='mxfp4'\\)"),
    ("qwen3_moe", dict(quantization_config={"quant_method": "awq", "bits": 4}), "quant_method='awq'"),
])
def test_unsupported_config_fields_are_named(tmp_path, name, change, field):
    d = _copy(tmp_path, name)
    _edit_config(d, **change)
    with pytest.raises(ConfigError, match=field):
        load_checkpoint(str(d))


def test_deepseek_v2_routing_is_softmax_limited_to_the_best_group():
    """The fixture is DeepSeek-V2-Lite's shape: no q LoRA, two shared experts, softmax routing
    limited to the group whose best expert scores highest, scaled, not renormalised."""
    cfg, params = load_checkpoint(os.path.join(FIX, "deepseek_v2"))
    assert (cfg.family, cfg.router_scoring, cfg.n_group, cfg.topk_group) == ("deepseek_v2", "softmax", 2, 1)
    assert (cfg.q_lora_rank, cfg.routed_scaling, cfg.norm_topk_prob, cfg.d_shared) == (0, 1.5, False, 64)
    assert "wq" in params["attn"]["layers"][1] and "router_bias" not in params["attn"]["layers"][1]


def test_deepseek_v2_round_trips_through_save_checkpoint(tmp_path):
    import jax
    from tarragon_jax.model.hf_loader import save_checkpoint
    cfg, params = load_checkpoint(os.path.join(FIX, "deepseek_v2"))
    save_checkpoint(cfg, params, str(tmp_path))
    cfg2, params2 = load_checkpoint(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_deepseek_v2_greedy_routing_ignores_the_groups(tmp_path):
    d = _copy(tmp_path, "deepseek_v2")
    _edit_config(d, topk_method="greedy")
    cfg, _ = load_checkpoint(str(d))
    assert (cfg.n_group, cfg.topk_group) == (1, 1)


def test_glm4_moe_is_gqa_with_partial_rope_and_deepseek_v3s_ffn():
    """The fixture is GLM-4.5's shape: q/k/v bias, q/k norm, RoPE on half of each head, sigmoid
    routing with a selection bias, a shared expert, the first layer dense."""
    cfg, params = load_checkpoint(os.path.join(FIX, "glm4_moe"))
    assert (cfg.family, cfg.head_dim, cfg.rotary_dim, cfg.qkv_bias, cfg.qk_norm) == ("glm4_moe", 24, 12, True, True)
    assert (cfg.router_scoring, cfg.n_group, cfg.routed_scaling, cfg.d_shared, cfg.first_k_dense) == \
        ("sigmoid", 2, 2.5, 32, 1)
    layer = params["attn"]["layers"][1]
    assert {"bq", "q_norm", "router_bias", "shared"} <= set(layer) and "mlp" in params["attn"]["layers"][0]


def test_glm4_moe_ignores_its_multi_token_prediction_layer(tmp_path):
    """GLM-4.5 ships one MTP layer after the decoder's (num_nextn_predict_layers); it is not used,
    while an unknown tensor inside the decoder is still an error."""
    d = _copy(tmp_path, "glm4_moe")
    _rewrite_tensors(d, lambda t: t.update({"model.layers.3.eh_proj.weight": np.ones((64, 128), np.float32)}))
    _edit_config(d, num_nextn_predict_layers=1)
    cfg, _ = load_checkpoint(str(d))
    assert cfg.n_layers == 3
    _rewrite_tensors(d, lambda t: t.update({"model.layers.2.eh_proj.weight": np.ones((64, 128), np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensors.*layers.2.eh_proj"):
        load_checkpoint(str(d))


def test_fp8_blocks_are_dequantized_as_deepseek_reads_a_partial_block():
    """w[i, j] * scale_inv[i // bm, j // bn], the grid rounded up: 576 rows of 128-row blocks (as
    DeepSeek-V3's kv_a_proj) are 5 blocks, the last one partial."""
    import ml_dtypes
    from tarragon_jax.model.quantized import fp8_dequantize
    rng = fresh_rng()
    w = rng.standard_normal((2, 40, 24)).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.5, 2.0, (2, 3, 2)).astype(np.float32)
    want = np.empty(w.shape, np.float32)
    for e, i, j in np.ndindex(*w.shape):
        want[e, i, j] = float(w[e, i, j]) * s[e, i // 16, j // 16]
    np.testing.assert_array_equal(fp8_dequantize(w, s, (16, 16)), want)
    with pytest.raises(ValueError, match=r"x: scale_inv has shape \(2, 2, 2\), expected \(2, 3, 2\)"):
        fp8_dequantize(w, s[:, :2], (16, 16), "x")


def _rewrite_raw(path, fn):
    """fn({name: (safetensors dtype, shape, bytes)}) on model.safetensors, FP8 tensors included
    (safetensors' numpy reader has no FP8 dtypes)."""
    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    tensors = {k: (t["dtype"], t["shape"], raw[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]])
               for k, t in header.items()}
    fn(tensors)
    out, data, at = {}, b"", 0
    for k, (dtype, shape, blob) in tensors.items():
        out[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(blob)]}
        data, at = data + blob, at + len(blob)
    head = json.dumps(out).encode()
    f.write_bytes(len(head).to_bytes(8, "little") + head + data)


def test_fp8_weights_without_their_scales_are_refused(tmp_path):
    d = _copy(tmp_path, "qwen3_moe_fp8")
    _rewrite_raw(d, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match="q_proj.weight' is FP8 but the checkpoint has no.*weight_scale_inv"):
        load_checkpoint(str(d))
    d = _copy(tmp_path / "b", "qwen3_moe_fp8")
    _rewrite_raw(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale_inv":
                                        ("F32", (3, 4), np.ones((3, 4), np.float32).tobytes())}))
    with pytest.raises(CheckpointError, match=r"q_proj.weight: scale_inv has shape \(3, 4\), expected \(6, 4\)"):
        load_checkpoint(str(d))


def test_fp8_checkpoint_is_the_f32_one_within_the_quantization_error():
    """The fixture quantizes qwen3_moe's files: what loads is those weights to within FP8's 3
    mantissa bits per 16x16 block, and the router, norms and embeddings exactly."""
    _, q = load_checkpoint(os.path.join(FIX, "qwen3_moe_fp8"))
    _, f = load_checkpoint(os.path.join(FIX, "qwen3_moe"))
    np.testing.assert_array_equal(q["attn"]["layers"][1]["router"], f["attn"]["layers"][1]["router"])
    np.testing.assert_array_equal(q["attn"]["embed"], f["attn"]["embed"])
    for a, b in ((q["attn"]["layers"][0]["wq"], f["attn"]["layers"][0]["wq"]),
                 (q["experts"][2]["w_down"], f["experts"][2]["w_down"])):
        assert not np.array_equal(a, b) and np.max(np.abs(a - b)) <= np.max(np.abs(b)) / 16


@pytest.mark.parametrize("name", ["deepseek_v2", "glm4_moe", "qwen3_moe_fp8"])
def test_keeps_transformers_tokens_through_an_ew_and_an_aw_failure(name):
    """Killed mid-run (an EW between two layers of a step, an AW later), with 2 AWs x 4 EWs: the
    tokens are transformers' greedy ones."""
    from tarragon_jax.control.faults import FaultInjector, parse_fault
    cfg, params = load_checkpoint(os.path.join(FIX, name))
    exp = _expected(name)
    faults = FaultInjector([parse_fault("ew:1@step=3,layer=1"), parse_fault("aw:0@step=6")])
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4, prefill_chunk=16,
                                           snapshot_interval_s=0), faults=faults)
    outs = eng.generate(exp["prompts"], SamplingParams(max_new_tokens=len(exp["greedy_new_tokens"][0])))
    assert outs == exp["greedy_new_tokens"]
    assert sorted(r.worker for r in eng.controller.records) == ["aw0", "ew1"]
    eng.close()


def test_deepseek_multi_token_prediction_layer_is_ignored(tmp_path):
    """DeepSeek-V3 checkpoints carry an MTP layer after the decoder's; decoding does not use it."""
    d = _copy(tmp_path, "deepseek_v3")
    _rewrite_tensors(d, lambda t: t.update({"model.layers.3.eh_proj.weight": np.ones((64, 128), np.float32)}))
    cfg, params = load_checkpoint(str(d))
    assert cfg.n_moe_layers == 2 and len(params["experts"]) == 2 and "mlp" in params["attn"]["layers"][0]


def test_deepseek_fields_left_out_mean_transformers_defaults(tmp_path):
    d = _copy(tmp_path, "deepseek_v3")
    _edit_config(d, routed_scaling_factor=None, norm_topk_prob=None, rope_interleave=None)
    cfg, _ = load_checkpoint(str(d))
    assert (cfg.routed_scaling, cfg.norm_topk_prob, cfg.rope_interleave) == (2.5, True, True)


def test_deepseek_without_shared_experts_loads_transformers_zero_size_tensors(tmp_path):
    d = _copy(tmp_path, "deepseek_v3")
    _edit_config(d, n_shared_experts=0)

    def empty_shared(t):
        for k in [k for k in t if ".shared_experts." in k]:
            t[k] = np.zeros((0,) + t[k].shape[1:], np.float32)
    _rewrite_tensors(d, empty_shared)
    cfg, params = load_checkpoint(str(d))
    assert cfg.d_shared == 0 and all("shared" not in lp for lp in params["attn"]["layers"])


def _fuse_experts(t):
    """Rewrite a per-expert checkpoint in the fused layout ([E, 2F, D] gate_up, [E, D, F] down)."""
    for layer in sorted({k.split(".")[2] for k in t if ".experts." in k}):
        pre = f"model.layers.{layer}.mlp.experts."
        n = len({k for k in t if k.startswith(pre) and k.endswith("gate_proj.weight")})
        pop = lambda j, name: t.pop(f"{pre}{j}.{name}.weight")
        gate, up, down = ([pop(j, name) for j in range(n)] for name in ("gate_proj", "up_proj", "down_proj"))
        t[pre + "gate_up_proj"] = np.concatenate([np.stack(gate), np.stack(up)], axis=1)
        t[pre + "down_proj"] = np.stack(down)


@pytest.mark.parametrize("fused", [False, True])
def test_a_worker_reads_only_its_part_and_gets_what_a_whole_load_gives(tmp_path, fused):
    """CheckpointWeights: the attention side and any experts of a layer, in any order, equal
    the whole load's; what crosses to a worker process is the path, not tensors."""
    import pickle
    import jax
    from tarragon_jax.model.hf_loader import CheckpointWeights
    d = _copy(tmp_path, "qwen3_moe")
    if fused:
        _rewrite_tensors(d, _fuse_experts)
    cfg, whole = load_checkpoint(str(d))
    w = CheckpointWeights(str(d))
    jax.tree.map(np.testing.assert_array_equal, w.attention(), whole["attn"])
    rng = fresh_rng()
    for layer in range(cfg.n_moe_layers):
        ids = [int(j) for j in rng.choice(cfg.n_experts, 3, replace=False)]
        got = w.experts(layer, ids)
        for k, a in whole["experts"][layer].items():
            np.testing.assert_array_equal(got[k], a[ids])
    assert len(pickle.dumps(w)) < 4096
