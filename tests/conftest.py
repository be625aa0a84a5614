"""Test setup: 8 simulated CPU devices (2 AWs + EWs on disjoint devices) and a persistent
compilation cache so repeated shapes across tests compile once."""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

from seeding import begin_test  # noqa: E402
from tarragon_jax.workers.runtime import use_compile_cache  # noqa: E402  (after XLA_FLAGS)

use_compile_cache(os.path.join(tempfile.gettempdir(), "tarragon_jax_test_cache"))


@pytest.fixture
def ieee_f32_dots():
    """XLA's f32 dots at full precision. A GPU runs them as TF32 by default (~1e-3 relative), and
    the f32 tolerances of tests whose XLA side is an oracle or a backend under test assume IEEE
    products; a no-op on CPU. The Pallas kernels ask for IEEE f32 themselves."""
    with jax.default_matmul_precision("highest"):
        yield


MAX_MAPS = 32768      # half of Linux's default vm.max_map_count (65530)


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:          # not Linux: nothing to count
        return 0


@pytest.fixture(autouse=True)
def _bounded_executables():
    """XLA:CPU maps memory for every executable it loads, and the suite's one process loads
    thousands (each test's engine shapes): past vm.max_map_count an mmap fails inside LLVM's
    loader and the process segfaults. Past half the limit, drop the loaded executables (later
    uses reload them from the persistent cache)."""
    yield
    if _memory_maps() > MAX_MAPS:
        jax.clear_caches()


@pytest.fixture(autouse=True)
def _test_seed(request):
    """Every test's random inputs derive from one seed, named in its failure report."""
    request.node.user_properties.append(("seed", begin_test()))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("random inputs", f"seed {seed}: rerun with TEST_SEED={seed}"))
