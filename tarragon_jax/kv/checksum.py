"""Per-block checksums of KV snapshots, one definition for the device and the host.

A block's checksum is sum_i (2i + 1) * word_i mod 2**32 over its words (its elements' bits as
unsigned integers, widened to 32 bits). The AW computes it inside the program that reads the
blocks out of its pages (kv_cache.read_blocks: no extra dispatch, no host CPU), and the store
checks restored copies with `block_sums_host`. Integer sums wrap the same in XLA and numpy, in any
order, so both agree bit for bit. A change of one word is always caught (odd weights are
invertible mod 2**32), other changes all but ~2**-32 of the time: enough against silently
changed files (Orbax/tensorstore return altered bytes without error); not a cryptographic hash.

Why not crc32 on the host: per block it held the writer thread's GIL (~8 us a block), ~1% of
the tiny model's decode time; the device sum costs the decode loop nothing.
"""
from __future__ import annotations

import numpy as np

_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def word_type(itemsize: int):
    """The unsigned integer type an element's bits are read as (then widened to uint32)."""
    if itemsize not in _WORD:
        raise ValueError(f"KV blocks must have 1-, 2- or 4-byte elements, got {itemsize} bytes")
    return _WORD[itemsize]


def weighted_sums(words_NxW, xp=np):
    """[N] uint32 checksums of N rows of uint32 words; xp is numpy or jax.numpy."""
    w = xp.arange(words_NxW.shape[1], dtype=xp.uint32) * xp.uint32(2) + xp.uint32(1)
    return xp.sum(words_NxW * w, axis=1, dtype=xp.uint32)


def block_sums_host(blocks_N: np.ndarray) -> np.ndarray:
    """[N] uint32 checksums of host blocks [N, ...]: kv_cache.block_sums' values."""
    blocks_N = np.ascontiguousarray(blocks_N)
    words = blocks_N.view(word_type(blocks_N.dtype.itemsize)).astype(np.uint32).reshape(len(blocks_N), -1)
    return weighted_sums(words)
