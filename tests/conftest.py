"""Test setup: 8 simulated CPU devices (2 AWs + EWs on disjoint devices) and a persistent
compilation cache so repeated shapes across tests compile once."""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tarragon_jax.runtime import use_compile_cache  # noqa: E402  (after XLA_FLAGS)

use_compile_cache(os.path.join(tempfile.gettempdir(), "tarragon_jax_test_cache"))
