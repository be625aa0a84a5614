"""tarragon_jax: resilient Mixture-of-Experts LLM inference in JAX (Tarragon, arXiv 2601.01310)."""
