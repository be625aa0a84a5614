"""Prefix caching's bookkeeping: chained block hashes, the allocator's sharing, reference counts
and LRU eviction with exact admission, the driver's prefix router, and the checkpoint store
keeping one copy per hash."""
import numpy as np
import pytest

from tarragon_jax.control.prefix_router import PrefixRouter
from tarragon_jax.config import SamplingParams
from tarragon_jax.kv.block_manager import BlockManager
from tarragon_jax.kv.checkpoint_store import CheckpointStore, SnapshotMissing
from tarragon_jax.kv.prefix_hash import block_hashes, cache_salt, extend_hashes
from tarragon_jax.kv.snapshot_manifest import BlockRef
from tarragon_jax.workers.sequence import Sequence
from seeding import fresh_rng

SALT = cache_salt("model", "float32", 4)


def test_hashes_chain_over_the_prefix_and_the_salt():
    rng = fresh_rng()
    a = rng.integers(0, 1000, 14).tolist()
    b = list(a)
    b[1] += 1                                                  # differs in block 0 only
    ha, hb = block_hashes(a, 4, SALT), block_hashes(b, 4, SALT)
    assert len(ha) == 3 and ha[0] != hb[0]
    assert all(x != y for x, y in zip(ha, hb))                 # every later block differs too: chained
    assert block_hashes(a[:8], 4, SALT) == ha[:2]              # a prefix hashes to a prefix
    assert block_hashes(a, 4, cache_salt("model", "bfloat16", 4)) != ha
    assert extend_hashes(block_hashes(a[:5], 4, SALT), a, 4, SALT) == ha   # incremental == at once


def test_shared_blocks_are_reference_counted_and_never_taken_while_held():
    bm = BlockManager(num_pages=9, page_size=4, caching=True)
    h = block_hashes(fresh_rng().integers(0, 99, 12).tolist(), 4, SALT)
    a = bm.allocate(1, 13)                                     # 4 pages
    for b in range(3):
        bm.register(1, b, h[b])
    assert bm.num_cached == 3 and bm.cached_run(h) == a[:3]
    b = bm.allocate(2, 10, h[:2])                              # shares 2 pages, takes 1
    assert b[:2] == a[:2] and b[2] not in a and bm.num_free == 8 - 5
    bm.free(1)
    assert bm.num_free == 3 + 2                                # request 1's private page + its last cached block
    assert bm.cached_run(h) == a[:3]                           # still cached: block 2 evictable, 0-1 held by 2
    bm.free(2)
    assert bm.num_free == 8 and bm.num_cached == 3


def test_evictable_blocks_count_as_free_and_go_least_recently_freed_first():
    bm = BlockManager(num_pages=5, page_size=2, caching=True)
    h = block_hashes(list(range(8)), 2, SALT)
    bm.allocate(1, 8)
    for b in range(4):
        bm.register(1, b, h[b])
    bm.free(1)                                                 # all 4 pages cached, none held
    assert bm.num_free == 4 and bm.can_allocate(8)             # a request that fits never waits on the cache
    assert bm.can_allocate(8, h) and bm.allocate(2, 8, h[:3])  # hits 3 evictable blocks, evicts the 4th
    assert bm.num_cached == 3 and bm.num_free == 0
    bm.free(2)
    assert bm.num_free == 4
    bm.allocate(3, 2)                                          # an uncached page first: nothing evicted
    assert len(bm.cached_run(h)) == 3
    bm.allocate(4, 2)                                          # evicts the last block freed first: block 2
    assert len(bm.cached_run(h)) == 2 and bm.num_cached == 2


def test_a_hit_that_is_evictable_is_not_free_for_the_rest():
    bm = BlockManager(num_pages=4, page_size=2, caching=True)  # 3 pages
    h = block_hashes([1, 2, 3, 4], 2, SALT)
    bm.allocate(1, 4)
    bm.register(1, 0, h[0])
    bm.register(1, 1, h[1])
    bm.free(1)
    assert bm.num_free == 3
    assert not bm.can_allocate(8, h[:1])                       # 1 hit + 3 new > 3 pages
    assert bm.can_allocate(6, h[:2]) and not bm.can_allocate(8, h[:2])
    with pytest.raises(MemoryError):
        bm.allocate(2, 8, h[:1])
    assert bm.num_cached == 2                                  # a failed allocation evicts nothing


def test_caching_off_shares_nothing_and_duplicates_stay_private():
    off = BlockManager(num_pages=6, page_size=2)
    h = block_hashes([5, 6, 7, 8], 2, SALT)
    off.allocate(1, 4)
    off.register(1, 0, h[0])
    assert off.num_cached == 0 and off.cached_run(h) == []
    on = BlockManager(num_pages=6, page_size=2, caching=True)
    on.allocate(1, 4)
    on.allocate(2, 4)
    on.register(1, 0, h[0])
    on.register(2, 0, h[0])                                   # computed twice at once: one copy is cached
    assert on.num_cached == 1 and on.cached_run(h) == on.block_table(1)[:1]
    assert on.share(2, 0, h[0]) and on.block_table(2)[0] == on.block_table(1)[0]
    on.free(1)
    on.free(2)
    assert on.num_free == 5


def _seq(rid, tokens):
    return Sequence(rid, list(tokens), SamplingParams(max_new_tokens=4), len(tokens) + 4)


class _AW:
    def __init__(self, index, live=(), used_pages=0):
        self.index, self.live = index, list(live)
        self.blocks = BlockManager(num_pages=200, page_size=4)
        self.blocks.allocate(-1, used_pages * 4)

    def live_requests(self):
        return self.live


def test_router_sends_a_request_to_the_aw_holding_its_prefix_unless_it_is_much_busier():
    rng = fresh_rng()
    system = rng.integers(0, 500, 64).tolist()
    router = PrefixRouter(page_size=4, capacity_blocks=100, salt=SALT)
    aws = [_AW(0), _AW(1, used_pages=10)]
    first = _seq(0, system + [1, 2])
    assert router.pick(first, aws).index == 0
    router.cached(0, first)                                   # it ran there and finished: its blocks stay
    assert router.pick(_seq(1, system + [3, 4, 5]), aws).index == 0
    assert router.pick(_seq(2, rng.integers(0, 500, 9).tolist()), [_AW(0, used_pages=3), aws[1]]).index == 0
    aws[0] = _AW(0, used_pages=12)                           # 48 tokens of load < 64 cached
    assert router.pick(_seq(3, system + [6]), aws).index == 0
    aws[0] = _AW(0, used_pages=30)                           # busy: the prefix is not worth the queue
    assert router.pick(_seq(4, system + [6]), aws).index == 1
    queued = _seq(5, rng.integers(0, 500, 120).tolist())     # queued requests count as load too
    assert router.pick(_seq(6, system + [7]), [_AW(0, [queued]), aws[1]]).index == 1
    router.forget(0)
    assert router.matched(0, router.hashes(_seq(7, system))) == 0
    off = PrefixRouter(page_size=4, capacity_blocks=100, salt=SALT, enabled=False)
    assert off.pick(_seq(8, system), [_AW(0, [first]), _AW(1)]).index == 1


def test_router_index_forgets_least_recently_sent_blocks_past_the_aw_capacity():
    router = PrefixRouter(page_size=2, capacity_blocks=4, salt=SALT)
    a, b = _seq(0, list(range(8))), _seq(1, list(range(100, 106)))
    router.cached(0, a)
    router.cached(0, b)
    assert router.matched(0, router.hashes(b)) == 3
    assert router.matched(0, router.hashes(a)) == 1            # a's leading block outlives its later ones


def _blocks(rng, n):
    return rng.standard_normal((n, 2, 2, 4, 2, 8)).astype(np.float32)


@pytest.mark.parametrize("memory_tier", [True, False])
def test_store_keeps_one_copy_per_hash_and_links_shared_blocks(memory_tier):
    rng = fresh_rng()
    x = _blocks(rng, 3)
    h = [11, 22, 33]
    with CheckpointStore(memory_tier=memory_tier, flush_interval_s=None) as store:
        store.snapshot(0, [BlockRef(1, b, h[b]) for b in range(3)], x)
        store.link(0, [BlockRef(2, 0, h[0]), BlockRef(2, 1, h[1])])          # request 2 shared blocks 0-1
        store.snapshot(0, [BlockRef(2, 2, 99), BlockRef(3, 0, h[0])], np.stack([x[2] + 1, x[0]]))
        store.wait()
        assert store.stats["saved_blocks"] == 4                              # h[0] written once
        assert store.stats["committed_blocks"] == 4
        assert np.array_equal(store.restore(2), np.stack([x[0], x[1], x[2] + 1]))
        store.drop(1)
        store.wait()
        assert np.array_equal(store.restore(2), np.stack([x[0], x[1], x[2] + 1]))   # held by request 2
        store.drop_memory_tier()
        assert np.array_equal(store.restore(3), x[:1])                        # from the files
        store.drop(2)
        store.drop(3)
        store.wait()
        assert store.stats["committed_blocks"] == 0
        with pytest.raises(SnapshotMissing):
            store.restore(3)


def test_a_link_to_a_hash_never_committed_commits_nothing():
    with CheckpointStore(flush_interval_s=None) as store:
        store.link(0, [BlockRef(5, 0, 1234)])
        store.wait()
        assert store.committed_blocks(5) == 0
        with pytest.raises(ValueError, match="prefix hash"):
            store.link(0, [BlockRef(5, 0)])
