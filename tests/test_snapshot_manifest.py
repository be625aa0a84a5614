"""Snapshot manifest on its own: commit, drop, committed prefix, file refcounts, epochs and AW
lives, checked against a plain model over seeded random operation sequences (no threads, no files)."""
import random

import pytest

from tarragon_jax.kv.snapshot_manifest import BlockRef, Entry, SnapshotManifest


def entry(ref: BlockRef, seq: int, path: str | None = None, aw: int = 0) -> Entry:
    return Entry(path, ref.key, sum=seq, shape=(1,), dtype="float32", seq=seq, aw=aw)


def test_prefix_stops_at_the_first_gap():
    m = SnapshotManifest()
    for b in (0, 1, 3):
        assert m.commit(BlockRef(5, b), entry(BlockRef(5, b), 0), epoch=0)
    assert [e.key for e in m.prefix(5)] == ["r5_b0", "r5_b1"] and m.num_blocks() == 3
    assert m.requests() == [5] and 5 in m and 6 not in m and m.prefix(6) == []


def test_gap_at_block_zero_is_an_empty_prefix_of_a_known_request():
    m = SnapshotManifest()
    m.commit(BlockRef(3, 1), entry(BlockRef(3, 1), 0), epoch=0)
    assert m.prefix(3) == [] and 3 in m


def test_a_drop_while_in_flight_stops_the_commit_until_settled():
    m, r = SnapshotManifest(), BlockRef(9, 0)
    [epoch] = m.epochs([r])
    assert m.drop(9) == []
    assert not m.wanted(r, 0, epoch) and not m.commit(r, entry(r, 0), epoch)
    m.settled()                                   # nothing in flight: the epochs start over
    [epoch] = m.epochs([r])
    assert m.commit(r, entry(r, 1), epoch) and len(m.prefix(9)) == 1


def test_files_are_reported_once_their_last_block_goes():
    m, a, b = SnapshotManifest(), BlockRef(1, 0), BlockRef(2, 0)
    m.commit(a, entry(a, 0, "f0"), 0)
    m.commit(b, entry(b, 0, "f0"), 0)
    m.commit(a, entry(a, 1, "f1"), 0)             # a's newer copy lives in f1
    assert m.unreferenced() == [] and m.referenced("f0") and m.referenced("f1")
    assert m.drop(2) == [0]
    assert m.unreferenced() == ["f0"] and not m.referenced("f0")
    assert m.unreferenced() == []                 # reported once


def test_the_durable_copy_commits_only_over_its_own_memory_entry():
    m, r = SnapshotManifest(), BlockRef(4, 0)
    assert not m.commit(r, entry(r, 0, "f0"), 0, own_only=True)    # nothing of snapshot 0 committed
    m.commit(r, entry(r, 0), 0)                                      # memory tier: snapshot 0
    m.commit(r, entry(r, 1), 0)                                      # replaced by snapshot 1
    assert not m.commit(r, entry(r, 0, "f0"), 0, own_only=True)
    assert m.commit(r, entry(r, 1, "f1"), 0, own_only=True)
    assert m.prefix(4)[0].path == "f1" and m.referenced("f1") and not m.referenced("f0")


def test_abandon_loses_the_aws_earlier_life_only():
    m = SnapshotManifest()
    life0, other = m.life(0), m.life(1)
    m.abandon(0)
    assert m.lost(0, life0) and not m.lost(0, m.life(0)) and not m.lost(1, other)


class Model:
    """The manifest's contract, written the plain way."""

    def __init__(self):
        self.committed: dict[tuple[int, int], Entry] = {}
        self.epoch: dict[int, int] = {}
        self.life: dict[int, int] = {}

    def refs(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.committed.values():
            if e.path is not None:
                out[e.path] = out.get(e.path, 0) + 1
        return out

    def wanted(self, r: BlockRef, seq: int, epoch: int, own_only: bool) -> bool:
        cur = self.committed.get((r.request_id, r.block))
        return self.epoch.get(r.request_id, 0) == epoch and (not own_only or (cur is not None and cur.seq == seq))

    def prefix(self, rid: int) -> list[Entry]:
        out = []
        while (rid, len(out)) in self.committed:
            out.append(self.committed[(rid, len(out))])
        return out


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_match_the_model(seed):
    rng = random.Random(seed)
    m, model = SnapshotManifest(), Model()
    in_flight: list[tuple[int, int, list[BlockRef], list[int], int]] = []   # (seq, aw, refs, epochs, life)
    seq, paths = 0, []
    for _ in range(400):
        before = model.refs()
        op = rng.choice(["send", "send", "land", "land", "persist", "persist", "drop", "abandon", "settle"])
        if op == "send":
            aw, rid = rng.randrange(3), rng.randrange(5)
            refs = [BlockRef(rid, b) for b in rng.sample(range(6), rng.randint(1, 4))]
            epochs, life = m.epochs(refs), m.life(aw)
            assert epochs == [model.epoch.get(rid, 0)] * len(refs) and life == model.life.get(aw, 0)
            in_flight.append((seq, aw, refs, epochs, life))
            seq += 1
        elif op in ("land", "persist") and in_flight:
            s, aw, refs, epochs, life = rng.choice(in_flight)
            assert m.lost(aw, life) == (life != model.life.get(aw, 0))
            path = f"f{len(paths)}" if op == "persist" else None
            own_only = op == "persist" and rng.random() < 0.5
            for r, epoch in zip(refs, epochs):
                e = entry(r, s, path, aw)
                want = model.wanted(r, s, epoch, own_only)
                assert m.wanted(r, s, epoch, own_only=own_only) == want
                assert m.commit(r, e, epoch, own_only=own_only) == want
                if want:
                    model.committed[(r.request_id, r.block)] = e
            if path is not None:
                paths.append(path)
        elif op == "drop":
            rid = rng.randrange(5)
            gone = sorted(b for (q, b) in model.committed if q == rid)
            assert sorted(m.drop(rid)) == gone
            model.committed = {k: e for k, e in model.committed.items() if k[0] != rid}
            model.epoch[rid] = model.epoch.get(rid, 0) + 1
        elif op == "abandon":
            aw = rng.randrange(3)
            m.abandon(aw)
            model.life[aw] = model.life.get(aw, 0) + 1
        elif op == "settle":                       # the writer caught up: nothing in flight
            in_flight.clear()
            m.settled()
            model.epoch.clear()
        after = model.refs()
        assert sorted(m.unreferenced()) == sorted(p for p in before if p not in after)
        assert all(m.referenced(p) == (p in after) for p in paths)
        assert m.requests() == sorted({rid for rid, _ in model.committed})
        assert m.num_blocks() == len(model.committed)
        for rid in range(5):
            assert m.prefix(rid) == model.prefix(rid)
            assert (rid in m) == any(q == rid for q, _ in model.committed)
