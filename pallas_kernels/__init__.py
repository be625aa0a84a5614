"""Pallas kernels for the expert FFN: grouped matmul (ragged dot) and fused SwiGLU.

One jitted function per op lowers to Mosaic GPU (Hopper) or Triton for CUDA, Mosaic TPU for TPU,
and the same Pallas kernel in interpret mode on CPU. See grouped_matmul.py and swiglu_ffn.py.
"""
