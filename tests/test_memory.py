"""Tests for model.memory: page lifecycle of simulated physical memory
(rules §2.3, §7.3)."""

import pytest

from model.cache import FRESH_ZEROED, LineState
from model.memory import ENTRIES_PER_TABLE, MemoryError_, PageUse, PhysicalMemory


def test_first_pfn_is_not_zero():
    mem = PhysicalMemory()
    assert mem.alloc_data() > 0


def test_pfns_are_never_reused():
    mem = PhysicalMemory()
    a = mem.alloc_data()
    t = mem.alloc_table()
    mem.free(a)
    mem.free(t)
    b = mem.alloc_data()
    u = mem.alloc_table()
    assert len({a, t, b, u}) == 4
    assert b > t > a and u > b


def test_multi_page_data_allocation_is_contiguous_and_disjoint():
    mem = PhysicalMemory()
    a = mem.alloc_data(4)
    b = mem.alloc_data(3)
    assert set(range(a, a + 4)).isdisjoint(range(b, b + 3))
    assert all(mem.page_use(p) is PageUse.DATA for p in range(a, a + 4))


def test_alloc_data_alignment():
    mem = PhysicalMemory()
    mem.alloc_data()  # next_pfn now odd
    pfn = mem.alloc_data(512, align=512)
    assert pfn % 512 == 0
    assert all(mem.page_use(p) is PageUse.DATA for p in range(pfn, pfn + 512))
    nxt = mem.alloc_data()
    assert nxt >= pfn + 512


def test_aligned_allocation_already_aligned_does_not_skip():
    mem = PhysicalMemory(next_pfn=1024)
    assert mem.alloc_data(512, align=512) == 1024


def test_alloc_data_pages_are_fresh_zeroed():
    mem = PhysicalMemory()
    pfn = mem.alloc_data(2)
    assert mem.line(pfn) == FRESH_ZEROED
    assert mem.line(pfn + 1) == FRESH_ZEROED


def test_alloc_table_has_512_zero_entries_and_refcount_one():
    mem = PhysicalMemory()
    pfn = mem.alloc_table()
    assert mem.tables[pfn] == [0] * ENTRIES_PER_TABLE
    assert ENTRIES_PER_TABLE == 512
    assert mem.refcount[pfn] == 1
    assert mem.page_use(pfn) is PageUse.TABLE
    assert mem.is_table(pfn)


def test_table_pages_are_independent_lists():
    mem = PhysicalMemory()
    a, b = mem.alloc_table(), mem.alloc_table()
    mem.tables[a][0] = 3
    assert mem.tables[b][0] == 0


def test_concatenated_pgd_allocation():
    mem = PhysicalMemory()
    mem.alloc_data()
    pgd = mem.alloc_table(PageUse.PGD, n=2)
    assert pgd % 2 == 0
    for p in (pgd, pgd + 1):
        assert mem.page_use(p) is PageUse.PGD
        assert mem.tables[p] == [0] * 512
        assert mem.refcount[p] == 1
        assert mem.is_table(p)


def test_data_page_is_not_a_table():
    mem = PhysicalMemory()
    assert not mem.is_table(mem.alloc_data())
    assert not mem.is_table(12345)


def test_free_marks_page_freed_and_drops_refcount():
    mem = PhysicalMemory()
    t = mem.alloc_table()
    mem.free(t)
    assert mem.page_use(t) is PageUse.FREED
    assert t not in mem.refcount
    assert not mem.is_table(t)


def test_free_data_page():
    mem = PhysicalMemory()
    d = mem.alloc_data()
    mem.free(d)
    assert mem.page_use(d) is PageUse.FREED


def test_double_free_raises():
    mem = PhysicalMemory()
    t = mem.alloc_table()
    mem.free(t)
    with pytest.raises(MemoryError_, match="double free"):
        mem.free(t)


def test_free_of_never_allocated_page_raises():
    mem = PhysicalMemory()
    with pytest.raises(MemoryError_):
        mem.free(0x12345)


def test_unlinked_table_is_still_a_table_until_freed():
    mem = PhysicalMemory()
    t = mem.alloc_table()
    mem.use[t] = PageUse.UNLINKED
    assert mem.is_table(t)
    assert t in mem.live_tables()
    mem.free(t)
    assert t not in mem.live_tables()


def test_live_tables():
    mem = PhysicalMemory()
    a, b = mem.alloc_table(), mem.alloc_table()
    d = mem.alloc_data()
    mem.free(a)
    assert mem.live_tables() == {b}
    assert d not in mem.live_tables()


def test_unknown_page_has_no_use_and_default_line():
    mem = PhysicalMemory()
    assert mem.page_use(7) is None
    assert mem.line(7) == LineState()


def test_set_line_round_trips():
    mem = PhysicalMemory()
    pfn = mem.alloc_data()
    s = LineState(mem=4, dline=5, dirty=True)
    mem.set_line(pfn, s)
    assert mem.line(pfn) == s
