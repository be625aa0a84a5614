"""Rotary position embedding as transformers computes it: default RoPE and YaRN.

YaRN (long-context scaling; DeepSeek-V3's configs, long-context Qwen3): frequencies past the
pretraining context are interpolated by `factor`, with a linear ramp between the `beta_fast` and
`beta_slow` rotation counts, and cos/sin are scaled by an attention factor. The frequencies are
computed on the host at trace time (the config is static), in f32 like transformers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def frequencies(cfg: ModelConfig, dim: int) -> np.ndarray:
    """inv_freq [dim / 2] (f32) for rotary dims `dim`."""
    base = cfg.rope_theta
    pos_freqs = (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = np.float32(1.0) / pos_freqs
    if not cfg.rope_yarn_factor:
        return extrapolation
    interpolation = np.float32(1.0) / (np.float32(cfg.rope_yarn_factor) * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.rope_yarn_original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_yarn_beta_fast), correction_dim(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    keep = np.float32(1) - ramp.astype(np.float32)              # 1: extrapolate (high frequencies)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def apply_rope(x_TxHxd: jax.Array, pos_T: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding on the last axis, non-interleaved halves (transformers' rotate_half). With
    cfg.rope_interleave the pairs are (x0, x1), (x2, x3), ... (DeepSeek); like transformers they
    are first gathered into halves, so the result is in the halves layout (q and k alike)."""
    hd = x_TxHxd.shape[-1]
    if cfg.rope_interleave:
        x_TxHxd = jnp.swapaxes(x_TxHxd.reshape(*x_TxHxd.shape[:-1], hd // 2, 2), -1, -2).reshape(x_TxHxd.shape)
    ang = pos_T.astype(jnp.float32)[:, None] * jnp.asarray(frequencies(cfg, hd))[None, :]   # [T, hd/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, None, :]                                   # [T, 1, hd]
    f = cfg.rope_attention_factor
    cos, sin = (jnp.cos(ang) * f).astype(x_TxHxd.dtype), (jnp.sin(ang) * f).astype(x_TxHxd.dtype)
    x1, x2 = jnp.split(x_TxHxd, 2, axis=-1)
    return x_TxHxd * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
