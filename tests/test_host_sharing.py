"""Tests for model.host: KSM, copy-on-write, mprotect and exit_mmap."""

import pytest

from model.host import PAGE, THP_PAGES, THP_SIZE, Vma
from model.memory import PageUse
from host_helpers import BASE, mm, value, write


# -------------------------------------------------------------------- KSM
def _two_pages():
    host = mm()
    a, b = BASE, BASE + PAGE
    pa, pb = host.fault_in(a, True).pfn, host.fault_in(b, True).pfn
    return host, a, b, pa, pb


def test_ksm_merge_shares_one_read_only_page():
    host, a, b, pa, pb = _two_pages()
    host.ksm_merge(a, b)
    for h in (a, b):
        p = host.pte(h)
        assert p.pfn == pa and p.ksm and not p.writable
    assert host.mem.page_use(pb) is PageUse.FREED
    assert host.mapcount[pa] == 2
    assert host.needs_cow(b, True) and not host.needs_cow(b, False)
    assert not host.needs_cow(BASE + 2 * PAGE, True)


def test_cow_break_gives_private_copy_and_keeps_the_ksm_page_cow():
    """Linux keeps a KSM page copy-on-write even for its last mapper."""
    host, a, b, pa, _ = _two_pages()
    write(host, a, 5)
    host.ksm_merge(a, b)
    host.cow_break(b)
    pb = host.pte(b)
    assert pb.pfn != pa and pb.writable and not pb.ksm
    assert value(host, b) == 5
    pa_pte = host.pte(a)
    assert pa_pte.pfn == pa and not pa_pte.writable and pa_pte.ksm
    assert host.mapcount[pa] == 1 and host.mapcount[pb.pfn] == 1
    assert host.needs_cow(a, True)


def test_cow_break_with_three_sharers_keeps_the_others_shared():
    host = mm()
    hvas = [BASE + i * PAGE for i in range(3)]
    for h in hvas:
        host.fault_in(h, True)
    keep = host.pte(hvas[0]).pfn
    host.ksm_merge(hvas[0], hvas[1])
    host.ksm_merge(hvas[0], hvas[2])
    assert host.mapcount[keep] == 3
    host.cow_break(hvas[2])
    assert all(host.pte(h).ksm and host.pte(h).pfn == keep for h in hvas[:2])
    assert host.mapcount[keep] == 2


def test_ksm_merge_respects_gup_reference_on_merged_page():
    host, a, b, _, pb = _two_pages()
    host.get_page(pb)
    host.ksm_merge(a, b)
    assert host.mem.page_use(pb) is PageUse.DATA
    host.put_page(pb)
    assert host.mem.page_use(pb) is PageUse.FREED


@pytest.mark.parametrize("detach", ["madvise_dontneed", "migrate"])
def test_cow_break_of_last_ksm_mapper_frees_the_ksm_page(detach):
    host, a, b, pa, _ = _two_pages()
    host.ksm_merge(a, b)
    if detach == "madvise_dontneed":
        host.madvise_dontneed(a, a + PAGE)
    else:
        host.migrate(a)
    assert host.needs_cow(b, True)
    host.cow_break(b)
    assert host.pte(b).pfn != pa
    assert pa not in host.mapcount or host.mapcount[pa] == 0
    assert host.mem.page_use(pa) is PageUse.FREED


def test_write_after_migrating_a_ksm_page_can_become_writable():
    host, a, b, _, _ = _two_pages()
    host.ksm_merge(a, b)
    host.migrate(b)
    pte = host.fault_in(b, True)
    assert host.needs_cow(b, True) or pte.writable


# --------------------------------------------------------------- mprotect
def test_mprotect_read_only_and_back():
    host = mm(size=4 * PAGE)
    for i in range(4):
        host.fault_in(BASE + i * PAGE, True)
    host.mprotect(BASE + PAGE, BASE + 3 * PAGE, False)
    assert [host.pte(BASE + i * PAGE).writable for i in range(4)] == [True, False, False, True]
    assert host.vma_at(BASE + PAGE) == Vma(BASE + PAGE, BASE + 3 * PAGE, writable=False)
    assert host.vma_at(BASE).writable and host.vma_at(BASE + 3 * PAGE).writable
    assert host.fault_in(BASE + 2 * PAGE, True) is None
    assert host.fault_in(BASE + 2 * PAGE, False) is not None
    pfn = host.pte(BASE + PAGE).pfn
    host.mprotect(BASE + PAGE, BASE + 3 * PAGE, True)
    assert host.pte(BASE + PAGE).writable and host.pte(BASE + PAGE).pfn == pfn
    assert host.fault_in(BASE + 2 * PAGE, True).writable


def test_mprotect_leaves_ksm_pages_read_only():
    host, a, b, _, _ = _two_pages()
    host.ksm_merge(a, b)
    host.mprotect(BASE, BASE + 2 * PAGE, True)
    assert not host.pte(a).writable and host.pte(a).ksm


def test_mprotect_new_faults_follow_vma():
    host = mm(size=4 * PAGE)
    host.mprotect(BASE, BASE + 4 * PAGE, False)
    assert not host.fault_in(BASE, False).writable


def test_mprotect_whole_thp_keeps_it_huge():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    host.mprotect(BASE, BASE + THP_SIZE, False)
    assert host.mapping_size(BASE) == THP_SIZE
    assert not any(host.pte(BASE + i * PAGE).writable for i in range(THP_PAGES))


def test_mprotect_part_of_thp_splits_it():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    host.mprotect(BASE + 5 * PAGE, BASE + 6 * PAGE, False)
    assert not host.pte(BASE + 5 * PAGE).writable
    assert host.mapping_size(BASE) == PAGE
    assert host.mapping_size(BASE + 5 * PAGE) == PAGE


# --------------------------------------------------------------- exit_mmap
def test_exit_mmap_drops_everything():
    host = mm(thp=True)
    host.fault_in(BASE, True)
    first = host.pte(BASE).pfn
    host.exit_mmap()
    assert host.ptes == {} and host.vmas == []
    assert all(host.mem.page_use(first + i) is PageUse.FREED for i in range(THP_PAGES))
    assert host.mapcount == {}
