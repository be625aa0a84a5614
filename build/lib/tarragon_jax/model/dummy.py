"""Dummy weights at real shapes from a config.json alone (`--load_format dummy`), as vLLM's
load format of that name: a model's speed at its true size without downloading it (the
configs of launch/configs/, or any Hugging Face config.json of a supported family).

Drawing tens of billions of normals would take minutes of host time, so every tensor is cut
from one seeded block of 2^20 normals, scaled like the tiny model's weights (model/tiny.py) and
made in the serving dtype. The tokens mean nothing; shapes, routing spread and cost are real.
"""
from __future__ import annotations

import json
import os

import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.model.hf_loader import CheckpointError, config_from_hf
from tarragon_jax.model.tiny import random_params

_BLOCK = 1 << 20


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of a config.json, or of a directory holding one."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise CheckpointError(f"no config.json at {path}")
    with open(file) as f:
        return config_from_hf(json.load(f))


def dummy_checkpoint(path: str, dtype=np.float32, seed: int = 0) -> tuple[ModelConfig, dict]:
    """(config, params) with the layout load_checkpoint gives, host leaves of `dtype`."""
    cfg = read_config(path)
    block = np.random.default_rng(seed).standard_normal(_BLOCK).astype(np.float32)

    def make(shape: tuple, scale: float, mean: float) -> np.ndarray:
        start = hash(tuple(shape)) % _BLOCK                     # tensors differ, cheaply
        flat = np.resize(np.roll(block, -start), int(np.prod(shape)))   # tiles the block: no RNG per element
        return (mean + flat.reshape(shape) * np.float32(scale)).astype(dtype)
    return cfg, random_params(cfg, seed, dtype, make=make)
