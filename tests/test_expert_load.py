"""Reading expert load from the EWs' cumulative per-slot counters: differences between reads, a
replacement worker counting from zero, slots appended after a failure, and rows per expert."""
import numpy as np

from tarragon_jax.control.expert_load import SlotRowReader, expert_rows


class _EW:
    def __init__(self, counts):
        self.counts = counts

    def slot_rows(self):
        return [np.asarray(c, np.int64) for c in self.counts]


def test_reads_are_differences_and_a_replacement_starts_from_zero():
    rng = np.random.default_rng(0)
    first = [rng.integers(0, 50, 3), rng.integers(0, 50, 3)]
    ew, reader = _EW(first), SlotRowReader()
    assert [r.tolist() for r in reader.read("ew0", ew)] == [f.tolist() for f in first]   # since it joined
    more = [f + rng.integers(0, 9, 3) for f in first]
    ew.counts = more
    assert [r.tolist() for r in reader.read("ew0", ew)] == [(m - f).tolist() for m, f in zip(more, first)]
    fresh = _EW([np.array([4, 0, 1]), np.array([2, 2, 2])])                # same name, a new worker
    assert [r.tolist() for r in reader.read("ew0", fresh)] == [[4, 0, 1], [2, 2, 2]]


def test_slots_appended_after_a_failure_count_from_zero():
    ew, reader = _EW([np.array([5, 6]), np.array([1, 1])]), SlotRowReader()
    reader.read("ew1", ew)
    ew.counts = [np.array([7, 6, 3]), np.array([1, 2])]                    # layer 0 loaded an orphan
    assert [r.tolist() for r in reader.read("ew1", ew)] == [[2, 0, 3], [0, 1]]


def test_rows_go_to_the_expert_each_slot_holds():
    rows = [np.array([3, 5, 7]), np.array([1, 2, 4])]
    slots = [[2, 0, 2], [1, -1, 3]]                                       # -1: a slot being overwritten
    assert expert_rows(rows, slots, 4) == [[5, 0, 10, 0], [0, 1, 0, 4]]
