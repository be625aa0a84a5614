"""Where a worker gets its weights: the part it serves, asked for by the worker itself.

An attention worker asks for the attention side (`attention()`: embedding, every layer's
attention, router, shared or dense MLP, head), an expert worker for the experts it hosts
(`experts(layer, ids)`), at startup and again for an orphaned expert after a failure. Under the
process runtime the object crosses to every worker process, so it must be small: a checkpoint's
path (hf_loader.CheckpointWeights), a dummy model's recipe (dummy.DummyWeights); only weights
built in memory (HostWeights: tests, a training demo, a library caller's own pytree) are shipped
whole.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import jax
import numpy as np


class Weights(Protocol):
    nbytes: int                     # host bytes the object itself carries to each process

    def attention(self) -> dict:
        """params["attn"]: the attention side of every layer, embedding and head."""

    def experts(self, layer: int, ids: Sequence[int]) -> dict:
        """{"w_gate": [n, D, F], "w_up": [n, D, F], "w_down": [n, F, D]} of these experts of MoE
        layer `layer`, host arrays."""

    def load(self) -> dict:
        """The whole model as one pytree {"attn": ..., "experts": [...]}."""


class HostWeights:
    """A params pytree already in this process's memory."""

    def __init__(self, params: dict):
        self.params = params

    @property
    def nbytes(self) -> int:
        """Asked only by the process runtime; read off the arrays (device ones are not copied)."""
        return sum(a.nbytes for a in jax.tree.leaves(self.params))

    def attention(self) -> dict:
        return self.params["attn"]

    def experts(self, layer: int, ids: Sequence[int]) -> dict:
        rows = np.asarray(list(ids), np.int32)
        return {k: np.asarray(v[rows]) for k, v in self.params["experts"][layer].items()}

    def load(self) -> dict:
        return self.params


def sizes(cfg) -> dict:
    """The model's pytree with each leaf's element count in place of the tensor (no weights read)."""
    from tarragon_jax.model.tiny import random_params
    return random_params(cfg, make=lambda shape, scale, mean: int(np.prod(shape)))


def as_weights(params: "dict | Weights") -> Weights:
    """A params pytree becomes HostWeights; a Weights object stays what it is."""
    return HostWeights(params) if isinstance(params, dict) else params
