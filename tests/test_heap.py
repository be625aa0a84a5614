"""freeze_startup_heap: what start-up built leaves the collector's walks; what serving allocates
later is still collected (a cycle made after the freeze is freed), and start-up's garbage is
collected before the freeze rather than kept forever."""
import gc
import weakref

from tarragon_jax.heap import freeze_startup_heap


class _Node:
    def __init__(self):
        self.self_ref = self                    # a cycle: only the collector frees it


def test_freeze_then_later_cycles_still_collected():
    before = _Node()
    dead_before = weakref.ref(_Node())          # start-up garbage (a cycle nobody holds)
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert dead_before() is None            # collected, not frozen
        assert not any(o is before for o in gc.get_objects())     # live start-up objects: frozen
        later = weakref.ref(_Node())
        gc.collect()
        assert later() is None                  # serving's garbage: collected as usual
    finally:
        gc.unfreeze()                           # the test process goes on as it was
