import pytest

from tarragon_jax.kv.block_manager import BlockManager


def test_sink_page_never_allocated_and_exhaustion():
    bm = BlockManager(num_pages=5, page_size=4)
    assert bm.capacity == 4
    pages = bm.allocate(1, 13)                      # 4 pages
    assert sorted(pages) == [1, 2, 3, 4] and 0 not in pages
    assert bm.num_free == 0 and not bm.can_allocate(1)
    with pytest.raises(MemoryError, match="request 2 needs 1 pages, 0 free"):
        bm.allocate(2, 1)
    assert bm.block_table(1) == pages               # a failed allocation corrupts nothing


def test_release_and_reuse():
    bm = BlockManager(num_pages=9, page_size=2)
    a = bm.allocate(1, 5)                           # 3 pages
    b = bm.allocate(2, 4)                           # 2 pages
    assert not set(a) & set(b)
    bm.free(1)
    assert bm.num_free == 6 and not bm.holds(1)
    c = bm.allocate(3, 8)                           # 4 pages, reusing request 1's
    assert set(a) <= set(c) and not set(b) & set(c)
    assert bm.block_table(2) == b


def test_double_allocate_and_unknown_free_raise():
    bm = BlockManager(num_pages=4, page_size=2)
    bm.allocate(7, 2)
    with pytest.raises(ValueError, match="already holds pages"):
        bm.allocate(7, 2)
    bm.free(7)
    with pytest.raises(KeyError, match="holds no pages"):
        bm.free(7)


def test_pages_for_rounds_up():
    bm = BlockManager(num_pages=4, page_size=16)
    assert [bm.pages_for(n) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]
