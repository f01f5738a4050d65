"""Tests for model.host: the VMM's address space (rules §3.4, §5; DESIGN §3)."""
import pytest

from model import cache
from model.host import PAGE, THP_PAGES, THP_SIZE, Vma, page_down, thp_down
from model.memory import PageUse
from host_helpers import BASE, mm, value, write


def test_helpers():
    assert page_down(BASE + 0x1234) == BASE + 0x1000
    assert thp_down(BASE + THP_SIZE + 0x1234) == BASE + THP_SIZE
    assert THP_PAGES == 512 and THP_SIZE == 2 << 20
    assert Vma(0, PAGE).contains(0) and not Vma(0, PAGE).contains(PAGE)


# --------------------------------------------------------------- fault_in
def test_fault_in_no_vma_is_none():
    host = mm()
    assert host.fault_in(BASE - PAGE, False) is None
    assert host.fault_in(BASE + 2 * THP_SIZE, True) is None
    assert host.ptes == {}


def test_fault_in_thp_allocates_512_contiguous_aligned_pages():
    host = mm(thp=True)
    pte = host.fault_in(BASE + THP_SIZE + 5 * PAGE, True)
    assert pte.huge and pte.writable
    first = host.pte(BASE + THP_SIZE).pfn
    assert first % THP_PAGES == 0
    for i in range(THP_PAGES):
        p = host.pte(BASE + THP_SIZE + i * PAGE)
        assert p.pfn == first + i and p.huge
    assert pte.pfn == first + 5
    assert host.mapping_size(BASE + THP_SIZE + 77 * PAGE) == THP_SIZE
    # the other window is untouched
    assert host.pte(BASE) is None
    assert all(host.mem.page_use(first + i) is PageUse.DATA for i in range(THP_PAGES))


def test_fault_in_fresh_page_reads_zero():
    host = mm(thp=True)
    host.fault_in(BASE, False)
    assert value(host, BASE) == 0
    assert value(host, BASE + 100 * PAGE) == 0


def test_fault_in_without_thp_vma_gives_4k():
    host = mm(thp=False)
    pte = host.fault_in(BASE + 3 * PAGE, True)
    assert not pte.huge
    assert host.pte(BASE + 4 * PAGE) is None
    assert host.mapping_size(BASE + 3 * PAGE) == PAGE
    assert len(host.ptes) == 1


def test_fault_in_thp_window_not_inside_vma_gives_4k():
    # VMA starts one page into the window: the window is not inside it
    host = mm(thp=True, start=BASE + PAGE, size=THP_SIZE)
    assert not host.thp_possible(BASE + 2 * PAGE)
    pte = host.fault_in(BASE + 2 * PAGE, False)
    assert not pte.huge
    assert len(host.ptes) == 1


def test_thp_possible():
    host = mm(thp=True, size=THP_SIZE + PAGE)
    assert host.thp_possible(BASE + 5 * PAGE)
    assert not host.thp_possible(BASE + THP_SIZE)  # window runs past the VMA end
    assert not host.thp_possible(BASE - PAGE)


def test_fault_in_thp_window_with_existing_page_gives_4k():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    host.madvise_dontneed(BASE + PAGE, BASE + 2 * PAGE)  # splits, drops one page
    pte = host.fault_in(BASE + PAGE, True)
    assert not pte.huge


def test_fault_in_existing_page_is_returned_unchanged():
    host = mm()
    first = host.fault_in(BASE, False)
    assert host.fault_in(BASE + 0x10, True) == first


def test_write_fault_on_read_only_vma_is_none_read_fault_is_ro():
    host = mm(writable=False)
    assert host.fault_in(BASE, True) is None
    pte = host.fault_in(BASE, False)
    assert pte is not None and not pte.writable


def test_mapping_size_unmapped_is_4k():
    assert mm(thp=True).mapping_size(BASE) == PAGE


# ------------------------------------------------------------------ GUP
def test_put_page_without_reference_raises():
    host = mm()
    pfn = host.fault_in(BASE, True).pfn
    with pytest.raises(ValueError):
        host.put_page(pfn)


def test_get_put_balance():
    host = mm()
    pfn = host.fault_in(BASE, True).pfn
    host.get_page(pfn)
    host.get_page(pfn)
    host.put_page(pfn)
    assert host.gup_refs[pfn] == 1
    host.put_page(pfn)
    assert pfn not in host.gup_refs
    assert host.mem.page_use(pfn) is PageUse.DATA  # still mapped


# ---------------------------------------------------------------- munmap
def test_munmap_frees_pages_and_removes_vma_part():
    host = mm(size=8 * PAGE)
    pfns = [host.fault_in(BASE + i * PAGE, True).pfn for i in range(4)]
    host.munmap(BASE + PAGE, BASE + 3 * PAGE)
    assert host.pte(BASE + PAGE) is None and host.pte(BASE + 2 * PAGE) is None
    assert host.mem.page_use(pfns[1]) is PageUse.FREED
    assert host.mem.page_use(pfns[2]) is PageUse.FREED
    assert host.mem.page_use(pfns[0]) is PageUse.DATA
    assert host.pte(BASE + 3 * PAGE).pfn == pfns[3]
    assert host.vma_at(BASE + PAGE) is None
    assert host.vma_at(BASE) == Vma(BASE, BASE + PAGE)
    assert host.vma_at(BASE + 3 * PAGE) == Vma(BASE + 3 * PAGE, BASE + 8 * PAGE)
    assert host.fault_in(BASE + 2 * PAGE, False) is None


def test_munmap_whole_vma():
    host = mm(size=4 * PAGE)
    host.fault_in(BASE, True)
    host.munmap(BASE, BASE + 4 * PAGE)
    assert host.vmas == [] and host.ptes == {}


def test_munmap_with_gup_reference_defers_free_to_put_page():
    host = mm()
    pfn = host.fault_in(BASE, True).pfn
    host.get_page(pfn)
    host.munmap(BASE, BASE + PAGE)
    assert host.pte(BASE) is None
    assert host.mem.page_use(pfn) is PageUse.DATA  # still referenced by KVM
    host.put_page(pfn)
    assert host.mem.page_use(pfn) is PageUse.FREED


def test_munmap_part_of_thp_splits_it_and_keeps_the_rest():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    first = host.pte(BASE).pfn
    host.munmap(BASE + 10 * PAGE, BASE + 12 * PAGE)
    assert host.mem.page_use(first + 10) is PageUse.FREED
    assert host.mem.page_use(first + 11) is PageUse.FREED
    for i in (0, 9, 12, 511):
        p = host.pte(BASE + i * PAGE)
        assert p.pfn == first + i and not p.huge
    assert host.mapping_size(BASE) == PAGE


# ------------------------------------------------------- madvise_dontneed
def test_madvise_dontneed_drops_pages_and_keeps_vma():
    host = mm()
    old = host.fault_in(BASE, True).pfn
    write(host, BASE, 42)
    host.madvise_dontneed(BASE, BASE + PAGE)
    assert host.pte(BASE) is None
    assert host.mem.page_use(old) is PageUse.FREED
    assert host.vma_at(BASE) is not None
    new = host.fault_in(BASE, False).pfn
    assert new != old
    assert value(host, BASE) == 0


def test_madvise_dontneed_respects_gup_reference():
    host = mm()
    pfn = host.fault_in(BASE, True).pfn
    host.get_page(pfn)
    host.madvise_dontneed(BASE, BASE + PAGE)
    assert host.mem.page_use(pfn) is PageUse.DATA
    host.put_page(pfn)
    assert host.mem.page_use(pfn) is PageUse.FREED


# ---------------------------------------------------------------- migrate
def test_migrate_moves_page_and_keeps_content():
    host = mm()
    old = host.fault_in(BASE, True).pfn
    write(host, BASE, 42)
    host.migrate(BASE)
    new = host.pte(BASE)
    assert new.pfn != old and new.writable
    assert host.mem.page_use(old) is PageUse.FREED
    assert value(host, BASE) == 42


def test_migrate_copies_through_cacheable_alias():
    # a dirty line holds the latest value, PoC is stale: the copy takes the line
    host = mm()
    pfn = host.fault_in(BASE, True).pfn
    host.mem.set_line(pfn, cache.LineState(mem=1, dline=2, dirty=True))
    host.migrate(BASE)
    assert value(host, BASE) == 2


def test_migrate_thp_moves_all_512_pages_to_a_new_huge_page():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    old_first = host.pte(BASE).pfn
    write(host, BASE + 7 * PAGE, 77)
    host.migrate(BASE + 3 * PAGE)
    first = host.pte(BASE).pfn
    assert first != old_first and first % THP_PAGES == 0
    for i in range(THP_PAGES):
        p = host.pte(BASE + i * PAGE)
        assert p.pfn == first + i and p.huge
        assert host.mem.page_use(old_first + i) is PageUse.FREED
    assert value(host, BASE + 7 * PAGE) == 77
    assert value(host, BASE + 8 * PAGE) == 0


def test_migrate_unmapped_is_noop():
    host = mm()
    host.migrate(BASE)
    assert host.ptes == {}


# ------------------------------------------------------------- THP split
def test_thp_split_keeps_pfns():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    before = {h: p.pfn for h, p in host.ptes.items()}
    host.thp_split(BASE + 100 * PAGE)
    assert {h: p.pfn for h, p in host.ptes.items()} == before
    assert not any(p.huge for p in host.ptes.values())
    assert host.mapping_size(BASE) == PAGE
    assert all(host.mem.page_use(pfn) is PageUse.DATA for pfn in before.values())


# ---------------------------------------------------------- THP collapse
def test_thp_collapse_copies_into_a_new_huge_page():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    host.thp_split(BASE)
    host.madvise_dontneed(BASE + PAGE, BASE + 2 * PAGE)  # a hole in the window
    old = host.pte(BASE).pfn
    write(host, BASE, 11)
    write(host, BASE + 511 * PAGE, 22)
    host.thp_collapse(BASE + 5 * PAGE)
    first = host.pte(BASE).pfn
    assert first % THP_PAGES == 0 and first != old
    assert all(host.pte(BASE + i * PAGE).huge for i in range(THP_PAGES))
    assert [host.pte(BASE + i * PAGE).pfn for i in range(THP_PAGES)] == \
        list(range(first, first + THP_PAGES))
    assert value(host, BASE) == 11
    assert value(host, BASE + 511 * PAGE) == 22
    assert value(host, BASE + PAGE) == 0  # the hole is a fresh zero page
    assert host.mem.page_use(old) is PageUse.FREED
    assert host.mapping_size(BASE + 3 * PAGE) == THP_SIZE


def test_thp_collapse_of_small_pages():
    host = mm(thp=True)
    # a 4K page faulted before the window could be THP (window partly mapped)
    host.fault_in(BASE, True)
    host.thp_split(BASE)
    host.thp_collapse(BASE)
    assert host.pte(BASE).huge
