"""Tests for model.oracle: host operations, memslots and R5 (dirty logging)."""

import pytest

from conformance.protocol import Memslot
from model.oracle import EFAULT, MMIO
from oracle_helpers import (
    GFN, HVA, PAGE, RO_GFN, RO_HVA, caches_on, hva, observe_read, oracle, read,
    set_logging, write)


# ---------------------------------------------------------- R1: host ops
def test_munmap_is_efault_until_mapped_again():
    o = oracle()
    observe_read(o, GFN + 1, 0)
    write(o, GFN, 5)
    o.host_op("munmap", hva(GFN), hva(GFN) + PAGE)
    assert o.guest_access(0, GFN, "read", None) == {EFAULT}
    assert o.guest_access(0, GFN, "write", 6) == {EFAULT}
    assert not o.vmm_write(hva(GFN), 6)
    assert read(o, GFN + 1) == {0}
    o.mmap(hva(GFN), hva(GFN) + PAGE)
    assert read(o, GFN) == {0}  # a fresh page


def test_dontneed_next_read_is_zero():
    o = oracle()
    write(o, GFN, 5)
    o.vmm_write(hva(GFN + 1), 6)
    o.host_op("madvise_dontneed", hva(GFN), hva(GFN) + PAGE)
    assert read(o, GFN) == {0}
    assert o.vmm_read(hva(GFN)) == {0}
    assert o.vmm_read(hva(GFN + 1)) == {6}


@pytest.mark.parametrize("op", ["migrate", "thp_collapse", "thp_split"])
def test_host_moves_keep_the_value(op):
    o = oracle()
    write(o, GFN, 5)  # caches off: PoC holds 5
    o.vmm_write(hva(GFN + 1), 6)
    o.host_op(op, hva(GFN), hva(GFN) + 512 * PAGE)
    assert read(o, GFN) == {5}
    assert read(o, GFN + 1) == {6}
    caches_on(o)
    assert read(o, GFN) == {5}


def test_ksm_merge_requires_equal_single_values():
    o = oracle()
    a, b, c = hva(GFN), hva(GFN + 1), hva(GFN + 2)
    assert o.can_ksm_merge(a, b)  # both fresh zero
    assert not o.can_ksm_merge(a, a)
    assert not o.can_ksm_merge(a, HVA + 4096 * PAGE)  # no VMA
    o.vmm_write(c, 5)
    assert not o.can_ksm_merge(a, c)
    observe_read(o, GFN + 3, 0)
    o.vmm_write(hva(GFN + 3), 5)  # cacheable value 5 for the host
    assert o.can_ksm_merge(c, hva(GFN + 3))


def test_ksm_merge_rejects_indeterminate_page():
    o = oracle()
    caches_on(o)
    observe_read(o, GFN, 0)
    o.write_sctlr(0, 0)
    o.vmm_read(hva(GFN), observed=0)
    write(o, GFN, 5)  # host may see 0 or 5
    assert len(o.values(hva(GFN), "cacheable")) == 2
    o.vmm_write(hva(GFN + 1), 5)
    assert not o.can_ksm_merge(hva(GFN + 1), hva(GFN))


def test_ksm_merge_then_cow_keeps_values():
    o = oracle()
    caches_on(o)
    a, b = hva(GFN), hva(GFN + 1)
    o.host_op("ksm_merge", b, b + PAGE, other=a)
    assert o.ksm == {a, b}
    write(o, GFN + 1, 7)  # breaks COW for b
    assert read(o, GFN + 1) == {7}
    assert read(o, GFN) == {0}
    assert o.vmm_read(a) == {0} and o.vmm_read(b) == {7}


# ------------------------------------------------------------- memslots
def test_memslot_delete_then_mmio_and_move():
    o = oracle()
    slot = o.memslots[0]
    observe_read(o, GFN, 0)
    o.set_memslot(slot, None)
    assert o.guest_access(0, GFN, "read", None) == {MMIO}
    assert GFN not in o.exposed
    moved = Memslot(0, GFN + 0x10000, 1024, HVA)
    o.set_memslot(None, moved)
    o.vmm_write(HVA, 5)
    assert read(o, GFN + 0x10000) == {5}


def test_memslot_move_unexposes_old_range():
    o = oracle()
    slot = o.memslots[0]
    observe_read(o, GFN, 0)
    o.vmm_write(HVA, 5)
    moved = Memslot(0, GFN + 0x10000, 1024, HVA)
    o.set_memslot(slot, moved)
    assert not o.exposed & set(range(GFN, GFN + 1024))
    assert read(o, GFN + 0x10000) == {5}


def test_dirty_log_only_tracks_guest_writes_while_logging():
    o = oracle()
    write(o, GFN, 1)  # before logging
    slot = set_logging(o)
    write(o, GFN + 1, 2)
    o.vmm_write(hva(GFN + 2), 3)  # VMM writes are not guest writes
    observe_read(o, GFN + 3, 0)
    assert o.harvest(slot, frozenset()) == (frozenset({GFN + 1}), frozenset())


def test_harvest_missing_extra_and_reset():
    o = oracle()
    slot = set_logging(o)
    write(o, GFN, 1)
    write(o, GFN + 5, 2)
    missing, extra = o.harvest(slot, frozenset({GFN, GFN + 9}))
    assert missing == {GFN + 5} and extra == {GFN + 9}
    # the round is over: nothing is owed any more
    assert o.harvest(slot, frozenset()) == (frozenset(), frozenset())
    write(o, GFN + 5, 3)
    assert o.harvest(slot, frozenset({GFN + 5})) == (frozenset(), frozenset())


def test_a_page_whose_write_is_in_flight_is_due_at_the_next_harvest():
    """A write fault concurrent with the harvest may mark its page after the
    harvest took the bitmap: missing now is legal, but the page stays owed."""
    o = oracle()
    slot = set_logging(o)
    write(o, GFN, 1)
    write(o, GFN + 1, 2)
    assert o.harvest(slot, frozenset(), in_flight=frozenset({GFN})) == \
        (frozenset({GFN + 1}), frozenset())
    assert o.harvest(slot, frozenset()) == (frozenset({GFN}), frozenset())
    write(o, GFN + 2, 3)
    assert o.harvest(slot, frozenset({GFN + 2}), in_flight=frozenset({GFN + 2})) == \
        (frozenset(), frozenset())
    assert o.harvest(slot, frozenset()) == (frozenset(), frozenset())  # reported: not owed


def test_disabling_logging_forgets_and_reenabling_starts_fresh():
    o = oracle()
    set_logging(o)
    write(o, GFN, 1)
    off = set_logging(o, False)
    write(o, GFN + 1, 2)
    assert o.harvest(off, frozenset()) == (frozenset(), frozenset())  # nothing owed
    slot = set_logging(o)
    write(o, GFN + 2, 3)
    assert o.harvest(slot, frozenset()) == (frozenset({GFN + 2}), frozenset())


def test_flags_change_keeping_logging_keeps_dirty_set():
    o = oracle()
    slot = set_logging(o)
    write(o, GFN, 1)
    same = Memslot(0, GFN, 1024, HVA, False, True)
    o.set_memslot(slot, same)
    assert o.harvest(same, frozenset())[0] == {GFN}


def test_read_only_slot_never_logs():
    o = oracle()
    o.mmap(RO_HVA, RO_HVA + 16 * PAGE)
    ro = Memslot(1, RO_GFN, 16, RO_HVA, readonly=True, log_dirty_pages=True)
    o.set_memslot(None, ro)
    o.guest_access(0, RO_GFN, "write", 5, observed=MMIO)
    assert o.harvest(ro, frozenset()) == (frozenset(), frozenset())
