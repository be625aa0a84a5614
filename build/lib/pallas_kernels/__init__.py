"""Pallas kernels: the expert FFN (grouped matmul / ragged dot, fused SwiGLU) and the attention
worker's paged decode attention.

One jitted function per op picks its kernel at lowering time: Triton for CUDA (the Mosaic GPU
Hopper kernel on request), Mosaic TPU for TPU, and the same Pallas kernel in interpret mode on CPU. See
grouped_matmul.py, swiglu_ffn.py and paged_attention.py.
"""
