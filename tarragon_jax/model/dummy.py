"""Dummy weights at real shapes from a config.json alone (`--load_format dummy`), as vLLM's
load format of that name: a model's speed at its true size without downloading it (the
configs of launch/configs/, or any Hugging Face config.json of a supported family).

Drawing tens of billions of normals would take minutes of host time, so every tensor is cut
from one seeded block of 2^20 normals, scaled like the tiny model's weights (model/tiny.py) and
made in the serving dtype. The tokens mean nothing; shapes, routing spread and cost are real.
A tensor is a recipe until a worker asks for it, and an expert worker makes only the rows of
the experts it hosts, so no process makes the whole model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.model import hf_loader
from tarragon_jax.model.tiny import random_params

_BLOCK = 1 << 20


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of a config.json, or of a directory holding one."""
    if os.path.isdir(path):
        return hf_loader.read_config(path)
    if not os.path.exists(path):
        raise hf_loader.CheckpointError(f"no config.json at {path}")
    with open(path) as f:
        return hf_loader.config_from_hf(json.load(f))


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """One tensor: mean + scale * (the block, rolled to a start given by the shape, tiled)."""
    shape: tuple
    scale: float
    mean: float


class DummyWeights:
    """The dummy model of a config (hf_loader.CheckpointWeights's interface); what crosses to a
    worker process is the config and the seed."""

    nbytes = 0

    def __init__(self, path: str, dtype=np.float32, seed: int = 0):
        self.config, self.dtype, self.seed = read_config(path), np.dtype(dtype), seed
        self._recipes = random_params(self.config, seed, make=_Recipe)
        self._block: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_block": None}

    def _make(self, r: _Recipe, row: int | None = None) -> np.ndarray:
        """The tensor, or one row of its leading axis (the same numbers the whole one has there)."""
        if self._block is None:
            self._block = np.random.default_rng(self.seed).standard_normal(_BLOCK).astype(np.float32)
        start, shape = hash(tuple(r.shape)) % _BLOCK, r.shape      # tensors differ, cheaply
        if row is not None:
            shape = r.shape[1:]
            start = (start + row * int(np.prod(shape))) % _BLOCK
        flat = np.resize(np.roll(self._block, -start), int(np.prod(shape)))   # tiles: no RNG per element
        return (r.mean + flat.reshape(shape) * np.float32(r.scale)).astype(self.dtype)

    def attention(self) -> dict:
        return jax.tree.map(self._make, self._recipes["attn"], is_leaf=lambda x: isinstance(x, _Recipe))

    def experts(self, layer: int, ids: Sequence[int]) -> dict:
        return {k: np.stack([self._make(r, j) for j in ids]) for k, r in self._recipes["experts"][layer].items()}

    def load(self) -> dict:
        E = self.config.n_experts
        return {"attn": self.attention(), "experts": [self.experts(l, range(E)) for l in range(len(self._recipes["experts"]))]}


def dummy_checkpoint(path: str, dtype=np.float32, seed: int = 0) -> tuple[ModelConfig, dict]:
    """(config, params) with the layout load_checkpoint gives, host leaves of `dtype`."""
    w = DummyWeights(path, dtype, seed)
    return w.config, w.load()
