"""Checkpoint store: commit semantics, both tiers, corruption detection, non-blocking snapshot."""
import glob
import os
import time

import jax
import numpy as np
import pytest

from tarragon_jax.kv.checkpoint_store import BlockRef, CheckpointStore, SnapshotCorrupt, SnapshotMissing

L, PS, KV, HD = 2, 4, 2, 8                     # one block: [L, 2, PS, KV, HD] f32 = 1 KiB


def rand_blocks(n: int, seed: int, page_size: int = PS) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, L, 2, page_size, KV, HD), dtype=np.float32)


def refs(rid: int, blocks) -> list[BlockRef]:
    return [BlockRef(rid, b) for b in blocks]


@pytest.fixture
def store(tmp_path):
    s = CheckpointStore(str(tmp_path / "kv"), flush_interval_s=None)     # one checkpoint per call
    yield s
    s.close()


def data_files(path: str) -> list[str]:
    return [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
            if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]


@pytest.mark.parametrize("tier", ["memory", "disk", "no_memory_tier"])
def test_roundtrip_both_tiers(tmp_path, tier):
    with CheckpointStore(str(tmp_path / "kv"), memory_tier=tier != "no_memory_tier") as s:
        x = rand_blocks(3, 0)
        s.snapshot(0, refs(7, range(3)), x)
        s.wait()
        if tier == "disk":
            s.drop_memory_tier()
        assert s.stats["memory_bytes"] == (x.nbytes if tier == "memory" else 0)
        np.testing.assert_array_equal(s.restore(7), x)
        np.testing.assert_array_equal(s.restore(7, num_blocks=2), x[:2])


def test_incremental_across_requests_and_calls(store):
    a, b = rand_blocks(5, 1), rand_blocks(3, 2)
    store.snapshot(0, refs(1, [0, 1]) + refs(2, [0]), np.concatenate([a[:2], b[:1]]))   # prefill
    for i in range(2, 5):                                                                # decode
        store.snapshot(0, refs(1, [i]), a[i:i + 1])
    store.snapshot(1, refs(2, [1, 2]), b[1:])                                             # another AW
    store.wait()
    assert store.committed_blocks(1) == 5 and store.committed_blocks(2) == 3
    assert store.requests() == [1, 2]
    for mem in (True, False):
        if not mem:
            store.drop_memory_tier()       # request 1 now spans 4 checkpoints on disk
        np.testing.assert_array_equal(store.restore(1), a)
        np.testing.assert_array_equal(store.restore(2), b)
        np.testing.assert_array_equal(store.restore(1, num_blocks=3), a[:3])
    st = store.stats
    assert (st["snapshots"], st["blocks"], st["bytes"], st["failed"]) == (5, 8, a.nbytes + b.nbytes, 0)
    assert st["save_max_s"] > 0 and st["blocked_max_s"] >= st["blocked_mean_s"] > 0


def test_prefix_stops_at_gap_and_token_math(store):
    x = rand_blocks(4, 3)
    store.snapshot(0, refs(5, [0, 1, 3]), x[[0, 1, 3]])
    store.wait()
    assert store.committed_blocks(5) == 2
    assert store.committed_tokens(5, page_size=16) == 32
    np.testing.assert_array_equal(store.restore(5), x[:2])
    with pytest.raises(SnapshotMissing, match="request 5: block 2"):
        store.restore(5, num_blocks=3)
    store.snapshot(0, refs(5, [2]), x[2:3])          # fills the gap: prefix jumps to 4
    store.wait()
    assert store.committed_tokens(5, page_size=16) == 64
    np.testing.assert_array_equal(store.restore(5), x)


def test_gap_at_block_zero_commits_nothing(store):
    store.snapshot(0, refs(3, [1, 2]), rand_blocks(2, 4))
    store.wait()
    assert store.committed_blocks(3) == 0 and store.committed_tokens(3, 16) == 0
    with pytest.raises(SnapshotMissing, match="request 3: block 0"):
        store.restore(3)


def test_resnapshot_replaces_block_and_gcs_old_checkpoint(store):
    x, y = rand_blocks(1, 5), rand_blocks(1, 6)
    store.snapshot(0, refs(4, [0]), x)
    store.wait()
    store.snapshot(0, refs(4, [0]), y)
    store.wait()
    assert not os.path.exists(store.directory / "aw0" / "00000000")
    store.drop_memory_tier()
    np.testing.assert_array_equal(store.restore(4), y)


def test_drop_forgets_and_missing_request(store):
    store.snapshot(0, refs(8, [0, 1]), rand_blocks(2, 7))
    store.wait()
    store.drop(8)
    store.wait()
    assert store.committed_blocks(8) == 0 and store.requests() == []
    assert store.stats["memory_bytes"] == 0
    assert not os.path.exists(store.directory / "aw0" / "00000000")      # files GC'd
    with pytest.raises(SnapshotMissing, match="request 8"):
        store.restore(8)
    with pytest.raises(SnapshotMissing, match="request 99"):
        store.restore(99)


def test_drop_while_in_flight_does_not_commit(store, monkeypatch):
    orig = store._write
    monkeypatch.setattr(store, "_write", lambda p, t: (time.sleep(0.2), orig(p, t)))
    store.snapshot(0, refs(9, [0]), rand_blocks(1, 8))
    store.drop(9)
    store.wait()
    assert store.committed_blocks(9) == 0
    assert not os.path.exists(store.directory / "aw0" / "00000000")


def test_corrupt_disk_file_detected(store):
    # Blocks >= 4 KiB get their own OCDBT data file, stored verbatim (smaller ones are packed and
    # zstd-framed); the copy read back is the one merged into <checkpoint>/d/, so flip every copy.
    x = rand_blocks(2, 9, page_size=32)
    store.snapshot(0, refs(6, [0, 1]), x)
    store.wait()
    store.drop_memory_tier()
    hits = 0
    for f in data_files(str(store.directory / "aw0" / "00000000")):
        raw = bytearray(open(f, "rb").read())
        at = raw.find(x[1].tobytes())
        if at >= 0:
            raw[at + 100] ^= 0xFF                    # a valid file, a silently wrong value
            open(f, "wb").write(bytes(raw))
            hits += 1
    assert hits >= 1
    np.testing.assert_array_equal(store.restore(6, num_blocks=1), x[:1])
    with pytest.raises(SnapshotCorrupt, match="request 6 block 1: checksum mismatch in the disk"):
        store.restore(6)


def test_garbled_or_deleted_files(store):
    store.snapshot(0, refs(1, [0]), rand_blocks(1, 10))
    store.snapshot(0, refs(2, [0]), rand_blocks(1, 11))
    store.wait()
    store.drop_memory_tier()
    for f in data_files(str(store.directory / "aw0" / "00000000")):
        open(f, "wb").write(os.urandom(64))
    with pytest.raises(SnapshotCorrupt, match="request 1"):
        store.restore(1)
    (store.directory / "aw0" / "00000001").rmtree()
    with pytest.raises(SnapshotMissing, match="request 2: checkpoint .* is gone"):
        store.restore(2)


def test_tampered_memory_tier_detected(store):
    x = rand_blocks(3, 12)
    store.snapshot(0, refs(2, range(3)), x)
    store.wait()
    bad = store._memory[(2, 1)].copy()
    bad[0, 0, 0, 0, 0] += 1.0
    store._memory[(2, 1)] = bad
    with pytest.raises(SnapshotCorrupt, match="request 2 block 1: checksum mismatch in the memory-tier"):
        store.restore(2)


def test_snapshot_does_not_wait_on_storage(store, monkeypatch):
    orig = store._write
    monkeypatch.setattr(store, "_write", lambda p, t: (time.sleep(0.5), orig(p, t)))
    x = jax.device_put(rand_blocks(4, 13), jax.devices()[1])
    t0 = time.perf_counter()
    store.snapshot(0, refs(1, range(4)), x)
    blocked = time.perf_counter() - t0
    assert blocked < 0.1, blocked
    assert store.stats["pending"] == 1          # not durable yet: the write is still sleeping
    with pytest.raises(TimeoutError):
        store.wait(timeout=0.05)
    store.wait()
    assert store.committed_blocks(1) == 4
    assert store.stats["save_max_s"] >= 0.5 > store.stats["blocked_max_s"]


def test_sums_from_the_device_read_are_kept_and_checked(store):
    """An AW passes the checksums its read program computed; the store keeps those (a wrong one
    is found at restore, so they are what it checks) and never recomputes them on ingest."""
    from tarragon_jax.kv.checksum import block_sums_host
    x = rand_blocks(3, 15)
    sums = block_sums_host(x)
    store.snapshot(0, refs(12, range(3)), jax.device_put(x), jax.device_put(sums))
    store.snapshot(0, refs(13, [0]), x[:1], sums[1:2])           # the wrong block's sum
    store.wait()
    np.testing.assert_array_equal(store.restore(12), x)
    with pytest.raises(SnapshotCorrupt, match="request 13 block 0: checksum mismatch in the memory-tier"):
        store.restore(13)


def test_device_array_on_non_default_device(store):
    x = rand_blocks(3, 14)
    dev = jax.device_put(x, jax.devices()[3])
    assert dev.devices() == {jax.devices()[3]}
    store.snapshot(2, refs(11, range(3)), dev)
    store.wait()
    np.testing.assert_array_equal(store.restore(11), x)
    store.drop_memory_tier()
    np.testing.assert_array_equal(store.restore(11), x)


@pytest.mark.parametrize("memory_tier", [False, True])
def test_writer_survives_failed_save(tmp_path, monkeypatch, memory_tier):
    store = CheckpointStore(str(tmp_path / "kv"), memory_tier=memory_tier, flush_interval_s=None)
    orig, calls = store._write, []

    def flaky(p, t):
        calls.append(p)
        if len(calls) == 1:
            raise OSError("disk full")
        orig(p, t)

    monkeypatch.setattr(store, "_write", flaky)
    x = rand_blocks(2, 15)
    store.snapshot(0, refs(1, [0]), x[:1])
    store.snapshot(0, refs(1, [1]), x[1:])
    store.wait()
    assert store.stats["failed"] == 1 and "disk full" in store.errors[0]
    if memory_tier:            # committed in the store's memory, but block 0 never became durable
        np.testing.assert_array_equal(store.restore(1), x)
        store.drop_memory_tier()
        with pytest.raises(SnapshotMissing, match="block 0 was never persisted"):
            store.restore(1)
    else:                      # without the memory tier a block commits only once written
        assert store.committed_blocks(1) == 0 and store.stats["committed_blocks"] == 1
    store.snapshot(0, refs(1, [0]), x[:1])                                             # retried
    store.wait()
    store.drop_memory_tier()
    np.testing.assert_array_equal(store.restore(1), x)
    store.close()


def test_padding_rows_past_the_refs_are_dropped(tmp_path):
    """The AW hands over its bucketed device read; only the first len(refs) rows are blocks."""
    s = CheckpointStore(str(tmp_path / "kv"))
    x = rand_blocks(4, 16)
    s.snapshot(0, refs(1, [0, 1]), x)
    s.wait()
    np.testing.assert_array_equal(s.restore(1), x[:2])
    s.close()


def test_bad_input_and_closed(tmp_path):
    s = CheckpointStore(str(tmp_path / "kv"))
    with pytest.raises(ValueError, match="blocks must be"):
        s.snapshot(0, refs(1, [0, 1]), rand_blocks(1, 16))             # fewer blocks than refs
    with pytest.raises(ValueError, match="duplicate"):
        s.snapshot(0, refs(1, [0, 0]), rand_blocks(2, 16))
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.snapshot(0, refs(1, [0]), rand_blocks(1, 16))


def test_default_directory_is_temporary_and_removed():
    s = CheckpointStore()
    d = s.directory
    assert d.name.startswith("tarragon_kv_") and d.exists()
    s.snapshot(0, refs(1, [0]), rand_blocks(1, 17))
    s.close()
    assert not d.exists()


def test_reused_directory_continues_sequence(tmp_path):
    x = rand_blocks(1, 18)
    with CheckpointStore(str(tmp_path / "kv")) as s:
        s.snapshot(0, refs(1, [0]), x)
    with CheckpointStore(str(tmp_path / "kv")) as s:   # a fresh manifest; must not collide on 00000000
        s.snapshot(0, refs(1, [0]), x)
        s.wait()
        assert s.stats["failed"] == 0 and s.committed_blocks(1) == 1


def test_snapshots_within_the_flush_window_share_one_checkpoint(tmp_path):
    with CheckpointStore(str(tmp_path / "kv"), flush_interval_s=5.0) as s:
        x = rand_blocks(3, 21)
        for b in range(3):
            s.snapshot(0, refs(4, [b]), x[b:b + 1])
        s.snapshot(1, refs(5, [0]), x[:1])
        s.wait()                                   # does not sit out the 5 s window
        assert s.committed_blocks(4) == 3 and s.committed_blocks(5) == 1
        assert len(list((s.directory / "aw0").iterdir())) == 1 and len(list((s.directory / "aw1").iterdir())) == 1
        s.drop_memory_tier()
        np.testing.assert_array_equal(s.restore(4), x)


@pytest.mark.parametrize("memory_tier", [True, False])
def test_a_request_finished_within_the_window_is_never_written(tmp_path, memory_tier):
    """Its blocks are dropped before the window's Orbax write: the write holds only live requests'
    blocks (and none at all when every request of the window finished)."""
    with CheckpointStore(str(tmp_path / "kv"), memory_tier=memory_tier, flush_interval_s=60) as s:
        live, done = rand_blocks(2, 3), rand_blocks(2, 4)
        s.snapshot(0, refs(1, [0, 1]) + refs(2, [0, 1]), np.concatenate([live, done]))
        s.drop(2)                                         # request 2 finished inside the window
        s.wait()                                          # the window is written now
        s.drop_memory_tier()
        np.testing.assert_array_equal(s.restore(1), live)
        with pytest.raises(SnapshotMissing):
            s.restore(2)
        assert s.stats["save_n"] == 1 and s.stats["saved_blocks"] == 2
        s.snapshot(0, refs(3, [0]), rand_blocks(1, 5))
        s.drop(3)
        s.wait()
        assert s.stats["save_n"] == 1                     # nothing left to write: no Orbax save


class _SlowCopy:
    """Blocks whose device->host copy lands only when `landed` is set (a copy in flight)."""

    def __init__(self, a: np.ndarray, landed):
        self.a, self.landed, self.shape, self.dtype = a, landed, a.shape, a.dtype

    def block_until_ready(self):
        self.landed.wait(30)

    def __array__(self, dtype=None, copy=None):
        return self.a


def test_abandon_loses_only_what_had_not_landed(store):
    import threading
    landed = threading.Event()
    kept, in_flight, queued = rand_blocks(1, 1), rand_blocks(1, 2), rand_blocks(1, 3)
    store.snapshot(0, refs(3, [0]), kept)
    store.wait()                                                   # landed and committed
    store.snapshot(0, refs(3, [1]), _SlowCopy(in_flight, landed))  # the writer waits for this copy
    time.sleep(0.2)
    store.snapshot(0, refs(3, [2]), queued)                        # queued behind it
    store.snapshot(1, refs(4, [0]), queued)                        # another AW's
    store.abandon(0)                                               # aw0 dies
    landed.set()
    store.wait()
    assert store.committed_blocks(3) == 1 and np.array_equal(store.restore(3)[0], kept[0])
    assert store.committed_blocks(4) == 1                          # aw1's snapshots are not aw0's
