"""Chained block hashes of a token sequence: the prefix cache's keys (kv/block_manager.py).

Block b's hash covers its page_size tokens and, through the hash of block b-1, every token before
it, so equal hashes mean equal prefixes (up to a 64-bit blake2b collision), and a salt of the
model and cache dtype keeps KV of different models or precisions apart. blake2b, not hash():
the driver and every worker process must agree on the keys. Host-only.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def cache_salt(*parts: object) -> bytes:
    """16 bytes naming what the KV depends on besides the tokens (model config, dtype, page size)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def extend_hashes(hashes: list[int], tokens: Sequence[int], page_size: int, salt: bytes) -> list[int]:
    """`hashes` (of the leading full blocks of `tokens`) extended in place to every full block."""
    for b in range(len(hashes), len(tokens) // page_size):
        prev = hashes[b - 1].to_bytes(8, "little") if b else salt
        block = np.asarray(tokens[b * page_size:(b + 1) * page_size], np.int64).tobytes()
        hashes.append(int.from_bytes(hashlib.blake2b(prev + block, digest_size=8).digest(), "little"))
    return hashes


def block_hashes(tokens: Sequence[int], page_size: int, salt: bytes) -> list[int]:
    """The chained hash of every full block of `tokens`."""
    return extend_hashes([], tokens, page_size, salt)
