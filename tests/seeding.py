"""Fresh random inputs in every run, reproducible from one number: each test draws a seed (or
takes TEST_SEED from the environment), a failing test's report names it, and every fresh_rng()
the test makes derives from it. Rerun a failure with TEST_SEED=<seed>."""
import os
import secrets

import numpy as np


class _Current:
    seed = 0
    made = 0          # generators made in this test so far: each is a distinct stream


_current = _Current()


def begin_test() -> int:
    """Called before each test (conftest): draws its seed."""
    _current.seed, _current.made = int(os.environ.get("TEST_SEED") or secrets.randbits(32)), 0
    return _current.seed


def fresh_rng() -> np.random.Generator:
    """A generator for this test's random inputs: new numbers each run, the same for one seed."""
    _current.made += 1
    return np.random.default_rng([_current.seed, _current.made])
