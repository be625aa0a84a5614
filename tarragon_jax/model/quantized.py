"""Quantized checkpoint weights, on the host (numpy + ml_dtypes, no jax).

FP8 block quantization (`quantization_config.quant_method == "fp8"` with `weight_block_size`:
DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8): a linear weight [out, in] is stored as
float8_e4m3fn beside `weight_scale_inv` [ceil(out / bm), ceil(in / bn)], and its value is
w[i, j] * scale_inv[i // bm, j // bn]. The grid is rounded up, as DeepSeek's reference
dequantizer reads it (a weight of 576 rows has 5 row blocks, the last one partial).
"""
from __future__ import annotations

import math
from typing import Sequence

import ml_dtypes
import numpy as np

from tarragon_jax.config import ConfigError

FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn),)


def fp8_block_size(quant: dict) -> tuple[int, int]:
    """The (rows, cols) block of an FP8 quantization_config; anything else is refused by name."""
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"unsupported config field: quantization_config.weight_block_size={block!r} (FP8 "
                          "checkpoints load with per-block scales: two positive ints, e.g. [128, 128])")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"unsupported config field: quantization_config.activation_scheme="
                          f"{quant['activation_scheme']!r} (only dynamic)")
    return block[0], block[1]


def fp8_dequantize(w: np.ndarray, scale_inv: np.ndarray, block: Sequence[int], name: str = "weight") -> np.ndarray:
    """float32 values of FP8 weights [..., out, in] with their block scales [..., ceil(out/bm), ceil(in/bn)]."""
    bm, bn = block
    rows, cols = w.shape[-2:]
    grid = (math.ceil(rows / bm), math.ceil(cols / bn))
    if w.dtype not in FP8_DTYPES:
        raise ValueError(f"{name}: has a scale_inv but is {w.dtype}, not float8_e4m3fn")
    if scale_inv.shape != w.shape[:-2] + grid:
        raise ValueError(f"{name}: scale_inv has shape {scale_inv.shape}, expected {w.shape[:-2] + grid} "
                         f"for blocks of {bm}x{bn}")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), bm, axis=-2), bn, axis=-1)[..., :rows, :cols]
    return w.astype(np.float32) * s
