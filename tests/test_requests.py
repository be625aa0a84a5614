"""Bad input is a clear error that names the problem and loses nothing already accepted."""
import pytest

from tarragon_jax.config import CacheConfig, ConfigError, EngineConfig, SamplingParams
from tarragon_jax.errors import RequestError
from tarragon_jax.model import reference
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine


@pytest.fixture(scope="module")
def engine():
    cfg, params = tiny_model("mixtral", max_position=64)
    return Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=2),
                  CacheConfig(page_size=4, num_pages=12)), cfg, params


@pytest.mark.parametrize("prompt, sp, msg", [
    ([], SamplingParams(), "prompt is empty"),
    ([1, 512], SamplingParams(), r"token id 512 out of range \[0, 512\)"),
    ([1, -2], SamplingParams(), "token id -2 out of range"),
    (["a", "b"], SamplingParams(), "integer token ids"),
    (list(range(3, 67)), SamplingParams(), "prompt too long: 64 tokens, model context is 64"),
    (list(range(3, 30)), SamplingParams(max_new_tokens=30), "needs 15 KV pages, an attention worker has 11"),
    ([1, 2], {"max_new_tokens": 3}, "must be SamplingParams"),
])
def test_bad_requests_are_named_and_lose_nothing(engine, prompt, sp, msg):
    eng, cfg, params = engine
    good = eng.submit([4, 5, 6], SamplingParams(max_new_tokens=3))
    with pytest.raises(RequestError, match=msg):
        eng.submit(prompt, sp)
    list(eng.stream())
    assert eng.requests[good].output == reference.greedy_generate(cfg, params, [4, 5, 6], 3)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature must be a number >= 0"),
    (dict(temperature="hot"), "temperature must be a number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\^32\)"),
    (dict(seed=2**32), r"seed must be an integer in \[0, 2\^32\)"),
    (dict(stop_token_ids=[3]), "stop_token_ids must be a tuple of integers"),
])
def test_bad_sampling_params(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        SamplingParams(**kwargs)


def test_bad_engine_config():
    with pytest.raises(ConfigError, match="unknown expert_backend 'cuda'"):
        EngineConfig(expert_backend="cuda")
    with pytest.raises(ConfigError, match="num_expert_workers must be >= 1"):
        EngineConfig(num_expert_workers=0)
