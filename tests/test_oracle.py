"""Tests for model.oracle, the executable specification (rules R1-R6 of its
docstring; DESIGN §3; reference §6.3-§6.5, §9.4)."""

import pytest

from conformance.protocol import SCTLR_C, SCTLR_M, Exit, Memslot, VmConfig
from model.cache import GARBAGE
from model.host import HostMm
from model.memory import PhysicalMemory
from model.oracle import EFAULT, MMIO, Oracle, Outcome

PAGE = 1 << 12
ON = SCTLR_M | SCTLR_C
HVA = 0x4000_0000
GFN = 0x40000  # slot 0: gfn GFN.. -> hva HVA.., 1024 pages (two 2 MiB windows)
RO_GFN, RO_HVA = 0x80000, 0x8000_0000


def oracle(**cfg):
    o = Oracle(VmConfig(**cfg))
    o.mmap(HVA, HVA + 1024 * PAGE)
    o.set_memslot(None, Memslot(0, GFN, 1024, HVA))
    return o


def hva(gfn):
    return HVA + (gfn - GFN) * PAGE


def read(o, gfn, vcpu=0, observed=None):
    """Allowed values of a guest read (all outcomes must be values)."""
    allowed = o.guest_access(vcpu, gfn, "read", None, observed=observed)
    assert all(a.exit is None for a in allowed), allowed
    return {a.value for a in allowed}


def fetch(o, gfn, vcpu=0, observed=None):
    allowed = o.guest_access(vcpu, gfn, "exec", None, observed=observed)
    return {a.value for a in allowed}


def write(o, gfn, value, vcpu=0):
    allowed = o.guest_access(vcpu, gfn, "write", value, observed=Outcome(value=value))
    assert allowed == {Outcome(value=value)}


def observe_read(o, gfn, value, vcpu=0):
    """The guest read ``value``: commit that observation."""
    allowed = read(o, gfn, vcpu, observed=Outcome(value=value))
    assert value in allowed
    return allowed


def caches_on(o, vcpu=0):
    o.write_sctlr(vcpu, ON)


# ------------------------------------------------------------ R2: exits
def test_no_memslot_is_mmio():
    o = oracle()
    assert MMIO == Outcome(exit=Exit.MMIO) and EFAULT == Outcome(exit=Exit.EFAULT)
    for kind in ("read", "write", "exec"):
        assert o.guest_access(0, 0x10, kind, 1) == {MMIO}


def test_write_to_read_only_memslot_is_mmio_read_is_ram():
    o = oracle()
    o.mmap(RO_HVA, RO_HVA + 16 * PAGE)
    o.set_memslot(None, Memslot(1, RO_GFN, 16, RO_HVA, readonly=True))
    assert o.guest_access(0, RO_GFN, "write", 5, observed=MMIO) == {MMIO}
    assert o.guest_access(0, RO_GFN, "read", None) == {Outcome(value=0)}
    # the MMIO write changed nothing
    assert o.vmm_read(RO_HVA) == {0}


def test_no_vma_is_efault():
    o = Oracle(VmConfig())
    o.set_memslot(None, Memslot(0, GFN, 16, HVA))
    for kind in ("read", "write", "exec"):
        assert o.guest_access(0, GFN, kind, 1) == {EFAULT}


def test_write_to_read_only_vma_is_efault_read_is_fine():
    o = oracle()
    o.host_op("mprotect_ro", hva(GFN), hva(GFN) + PAGE)
    assert o.guest_access(0, GFN, "write", 5, observed=EFAULT) == {EFAULT}
    assert read(o, GFN) == {0}
    assert o.guest_access(0, GFN + 1, "write", 6) == {Outcome(value=6)}
    o.host_op("mprotect_rw", hva(GFN), hva(GFN) + PAGE)
    assert o.guest_access(0, GFN, "write", 7) == {Outcome(value=7)}


def test_exit_observation_does_not_change_state():
    o = oracle()
    o.host_op("mprotect_ro", hva(GFN), hva(GFN) + PAGE)
    o.guest_access(0, GFN, "write", 5, observed=EFAULT)
    assert GFN not in o.exposed
    assert o.vmm_read(hva(GFN)) == {0}


def test_unobserved_access_does_not_commit():
    o = oracle()
    o.guest_access(0, GFN, "write", 5)  # no observation: nothing happened
    assert read(o, GFN) == {0}
    # an observation outside the allowed set is not committed either
    o.guest_access(0, GFN, "write", 6, observed=Outcome(value=99))
    assert read(o, GFN) == {0}


# ------------------------------------------------------- R1 / R3: values
def test_fresh_page_reads_zero_with_caches_off_and_on():
    o = oracle()
    assert read(o, GFN) == {0}
    caches_on(o, 1)
    assert read(o, GFN + 7, vcpu=1) == {0}


@pytest.mark.parametrize("mode", ["on", "off"])
def test_guest_write_then_read_returns_value(mode):
    o = oracle()
    if mode == "on":
        caches_on(o)
    write(o, GFN, 5)
    assert read(o, GFN) == {5}
    if mode == "on":
        assert o.vmm_read(hva(GFN)) == {5}
    else:  # NC write below a possibly stale clean line (reference §6.1 hazard b)
        assert o.vmm_read(hva(GFN)) == {0, 5}


def test_vmm_write_then_read():
    o = oracle()
    assert o.vmm_write(hva(GFN), 5)
    assert o.vmm_read(hva(GFN)) == {5}


def test_vmm_write_without_vma_fails():
    o = oracle()
    assert not o.vmm_write(HVA + 4096 * PAGE, 5)


def test_vmm_write_before_first_access_is_seen_with_caches_off():
    # G-C1: the page is cleaned to PoC when it is first exposed
    o = oracle()
    o.vmm_write(hva(GFN), 5)
    assert o.guest_access(0, GFN, "read", None) == {Outcome(value=5)}
    observe_read(o, GFN, 5)
    assert read(o, GFN) == {5}


def test_vmm_write_to_exposed_page_with_caches_off_is_indeterminate():
    o = oracle()
    observe_read(o, GFN, 0)  # exposes GFN's window
    o.vmm_write(hva(GFN), 5)
    assert read(o, GFN) == {0, 5}
    # the VMM itself always sees its write (cacheable alias)
    assert o.vmm_read(hva(GFN)) == {5}


def test_vmm_write_to_exposed_page_with_caches_on_is_coherent():
    o = oracle()
    caches_on(o)
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN), 5)
    assert read(o, GFN) == {5}


def test_exposure_covers_the_2mib_window_only():
    o = oracle()
    for g in (GFN + 511, GFN + 512):
        o.vmm_read(hva(g))  # the host touched them before the guest ran
    observe_read(o, GFN + 3, 0)
    assert GFN in o.exposed and GFN + 511 in o.exposed
    assert GFN + 512 not in o.exposed
    o.vmm_write(hva(GFN + 511), 5)
    o.vmm_write(hva(GFN + 512), 6)
    assert read(o, GFN + 511) == {0, 5}  # window neighbour: maybe block-mapped
    assert read(o, GFN + 512) == {6}  # next window: first exposure cleans


def test_notifier_invalidation_makes_it_defined_again():
    o = oracle()
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN), 5)
    assert read(o, GFN) == {0, 5}
    o.invalidate(hva(GFN), hva(GFN) + PAGE)  # G-C4 clean after unmap
    assert GFN not in o.exposed
    assert read(o, GFN) == {5}
    observe_read(o, GFN, 5)
    o.host_op("thp_split", hva(GFN), hva(GFN) + PAGE)
    o.vmm_write(hva(GFN), 6)  # a later write before re-exposure
    assert read(o, GFN) == {6}


def test_invalidation_only_affects_its_range():
    o = oracle()
    o.vmm_read(hva(GFN + 1))
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN + 1), 5)
    o.invalidate(hva(GFN), hva(GFN) + PAGE)
    assert GFN + 1 in o.exposed
    assert read(o, GFN + 1) == {0, 5}


def test_guest_nc_write_then_host_read_after_unmap_is_defined():
    # guest NC write over a stale line: the host may see the stale line until
    # KVM cleans+invalidates after unmap (G-C4)
    o = oracle()
    caches_on(o)
    observe_read(o, GFN, 0)  # a clean line of 0 may stay
    o.write_sctlr(0, 0)  # caches off (flushes: TVM armed)
    o.vmm_read(hva(GFN), observed=0)  # host cacheable read re-allocates the line
    write(o, GFN, 5)
    assert o.vmm_read(hva(GFN)) == {0, 5}
    o.host_op("migrate", hva(GFN), hva(GFN) + PAGE)
    assert o.vmm_read(hva(GFN)) == {5}


def test_dic_makes_fetch_coherent_with_data():
    o = oracle(dic=True)
    caches_on(o)
    assert fetch(o, GFN) == {0}
    write(o, GFN, 5)
    assert fetch(o, GFN) == {5}


def test_fetch_of_code_loaded_before_first_run():
    # G-C1 + G-C2: VMM writes code before the page is mapped
    for idc in (False, True):
        o = oracle(idc=idc)
        o.vmm_write(hva(GFN), 5)
        assert fetch(o, GFN) == {5}


def test_guest_fetching_its_own_writes_is_indeterminate_without_dic():
    o = oracle()
    caches_on(o)
    assert fetch(o, GFN, observed=Outcome(value=0)) == {0}
    write(o, GFN, 5)
    assert fetch(o, GFN) == {0, 5}


# -------------------------------------------------- observation filter
def test_observation_narrows_later_reads():
    o = oracle()
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN), 5)
    assert read(o, GFN) == {0, 5}
    observe_read(o, GFN, 5)  # the dirty line reached PoC
    assert read(o, GFN) == {5}  # the old value can never come back


def test_observing_the_old_value_keeps_the_new_one_possible():
    o = oracle()
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN), 5)
    observe_read(o, GFN, 0)
    assert read(o, GFN) == {0, 5}


def test_vmm_read_observation_narrows():
    o = oracle()
    caches_on(o)
    observe_read(o, GFN, 0)
    o.write_sctlr(0, 0)
    o.vmm_read(hva(GFN), observed=0)
    write(o, GFN, 5)  # NC write below a possibly stale clean line
    assert o.vmm_read(hva(GFN)) == {0, 5}
    o.vmm_read(hva(GFN), observed=5)
    assert o.vmm_read(hva(GFN)) == {5}


def test_values_are_never_garbage_after_zeroing_for_cacheable_readers():
    o = oracle()
    assert o.values(hva(GFN), "cacheable") == {0}
    assert GARBAGE in o.values(hva(GFN), "nc")  # unexposed: PoC still garbage


# -------------------------------------------------------- R4: TVM, set/way
def _stale_after_nc_write(o):
    """Caches on, read (clean line of 0 allocated), caches off, NC write 5:
    the page holds PoC=5 below a possibly stale line of 0."""
    caches_on(o)
    observe_read(o, GFN, 0)
    o.write_sctlr(0, 0)
    observe_read(o, GFN, 0)
    write(o, GFN, 5)


def test_tvm_armed_at_init_and_caches_on_toggle_flushes():
    o = oracle()
    assert o.tvm_armed == [True, True]
    write(o, GFN, 5)  # caches off: NC write to PoC
    o.sctlr[0] = 0
    caches_on(o)  # armed: kvm_toggle_cache flushes, then TVM clears
    assert o.tvm_armed[0] is False and o.tvm_armed[1] is True
    assert read(o, GFN) == {5}


def test_toggle_after_tvm_cleared_does_not_flush():
    o = oracle()
    caches_on(o)  # armed -> flush, disarm
    assert not o.tvm_armed[0]
    observe_read(o, GFN, 0)  # clean line of 0 allocated
    o.write_sctlr(0, 0)  # not trapped: no flush
    assert not o.tvm_armed[0]
    write(o, GFN, 5)  # NC
    caches_on(o)  # not trapped: no flush; the stale line may still hit
    assert read(o, GFN) == {0, 5}


def test_caches_off_toggle_while_armed_flushes_and_stays_armed():
    o = oracle()
    o.sctlr[0] = ON  # caches on without the (flushing) trap; TVM still armed
    write(o, GFN, 5)  # cacheable: a dirty line of 5 over PoC 0
    assert o.tvm_armed[0]
    o.write_sctlr(0, 0)  # turning caches off while armed cleans dirty lines
    assert o.tvm_armed[0]
    assert read(o, GFN) == {5}


def test_caches_off_without_tvm_leaves_dirty_line():
    o = oracle()
    o.sctlr[0] = ON
    o.tvm_armed[0] = False
    write(o, GFN, 5)
    o.write_sctlr(0, 0)
    assert read(o, GFN) == {0, 5}


def test_set_way_rearms_and_flushes_once():
    o = oracle()
    _stale_after_nc_write(o)
    assert not o.tvm_armed[0]
    o.set_way(0)  # first S/W op with TVM clear: flush and re-arm
    assert o.tvm_armed[0]
    caches_on(o)  # armed: flush again
    assert read(o, GFN) == {5}


def test_set_way_while_armed_does_nothing():
    o = oracle()
    # vCPU1 builds a stale line below an NC write, with its TVM cleared
    caches_on(o, 1)
    observe_read(o, GFN, 0, vcpu=1)
    o.write_sctlr(1, 0)
    write(o, GFN, 5, vcpu=1)
    o.set_way(0)  # vCPU0 is still armed: no flush (the toggle will do it)
    assert o.tvm_armed == [True, False]
    caches_on(o, 1)  # not trapped for vCPU1
    assert read(o, GFN, vcpu=1) == {0, 5}
    o.set_way(1)  # vCPU1's first S/W op with TVM clear: flush and re-arm
    assert o.tvm_armed == [True, True]
    assert read(o, GFN, vcpu=1) == {5}


def test_stale_line_visible_without_maintenance():
    o = oracle()
    _stale_after_nc_write(o)
    caches_on(o)  # TVM already cleared: no flush
    assert read(o, GFN) == {0, 5}


def test_set_way_flush_cleans_stale_line():
    o = oracle()
    _stale_after_nc_write(o)
    o.set_way(0)
    o.sctlr[0] = ON  # pretend the toggle is not trapped: only set/way flushed
    assert read(o, GFN) == {5}


def test_toggle_flush_skips_pages_a_later_fault_in_the_window_may_have_dropped():
    # The guest writes GFN+1 with caches off (PoC 5; a stale clean line of 0
    # may remain), then faults on GFN in the same 2 MiB window: KVM may replace
    # a block by a table there and drop GFN+1 without any CMO (§2.5, §6.2),
    # so the caches-on flush need not reach it. The VMM may read the stale 0.
    o = oracle()
    write(o, GFN + 1, 5)
    observe_read(o, GFN, 0)
    caches_on(o)
    assert o.vmm_read(hva(GFN + 1)) == {0, 5}
    assert read(o, GFN) == {0}  # GFN is certainly mapped: flushed


def test_toggle_flush_covers_the_page_last_accessed_in_each_window():
    o = oracle()
    write(o, GFN + 1, 5)  # NC write; stale clean line of 0 possible
    write(o, GFN + 512, 7)  # the other window: GFN + 1 stays certainly mapped
    caches_on(o)
    assert o.vmm_read(hva(GFN + 1)) == {5}
    assert o.vmm_read(hva(GFN + 512)) == {7}


def test_mprotect_rw_invalidates_nothing():
    # R6: permission upgrades are invisible
    o = oracle()
    observe_read(o, GFN, 0)
    o.host_op("mprotect_rw", hva(GFN), hva(GFN) + PAGE)
    assert GFN in o.exposed
    o.host_op("mprotect_ro", hva(GFN), hva(GFN) + PAGE)
    assert GFN not in o.exposed


# ----------------------------------------------------------------- FWB
def test_fwb_is_coherent_everywhere():
    o = oracle(fwb=True)
    assert o.tvm_armed == [False, False]
    assert o.guest_cacheable(0)
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN), 5)
    assert read(o, GFN) == {5}
    write(o, GFN, 6)
    assert o.vmm_read(hva(GFN)) == {6}
    o.set_way(0)
    o.write_sctlr(0, ON)
    assert o.tvm_armed == [False, False]
    assert read(o, GFN) == {6}


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


# -------------------------------------------------------- R5: dirty log
def _logging(o, on=True):
    old = o.memslots[0]
    new = Memslot(0, old.base_gfn, old.npages, old.userspace_addr, old.readonly, on)
    o.set_memslot(old, new)
    return new


def test_dirty_log_only_tracks_guest_writes_while_logging():
    o = oracle()
    write(o, GFN, 1)  # before logging
    slot = _logging(o)
    write(o, GFN + 1, 2)
    o.vmm_write(hva(GFN + 2), 3)  # VMM writes are not guest writes
    observe_read(o, GFN + 3, 0)
    assert o.harvest(slot, frozenset()) == (frozenset({GFN + 1}), frozenset())


def test_harvest_missing_extra_and_reset():
    o = oracle()
    slot = _logging(o)
    write(o, GFN, 1)
    write(o, GFN + 5, 2)
    missing, extra = o.harvest(slot, frozenset({GFN, GFN + 9}))
    assert missing == {GFN + 5} and extra == {GFN + 9}
    # the round is over: nothing is owed any more
    assert o.harvest(slot, frozenset()) == (frozenset(), frozenset())
    write(o, GFN + 5, 3)
    assert o.harvest(slot, frozenset({GFN + 5})) == (frozenset(), frozenset())


def test_disabling_logging_forgets_and_reenabling_starts_fresh():
    o = oracle()
    _logging(o)
    write(o, GFN, 1)
    off = _logging(o, False)
    write(o, GFN + 1, 2)
    assert o.harvest(off, frozenset()) == (frozenset(), frozenset())  # nothing owed
    slot = _logging(o)
    write(o, GFN + 2, 3)
    assert o.harvest(slot, frozenset()) == (frozenset({GFN + 2}), frozenset())


def test_flags_change_keeping_logging_keeps_dirty_set():
    o = oracle()
    slot = _logging(o)
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


# ---------------------------------------------------------------- clone
def test_clone_is_independent():
    o = oracle()
    write(o, GFN, 5)
    c = o.clone()
    write(c, GFN, 6)
    caches_on(c)
    c.host_op("munmap", hva(GFN + 1), hva(GFN + 1) + PAGE)
    assert read(o, GFN) == {5}
    assert o.sctlr[0] == 0 and o.tvm_armed[0]
    assert o.vma_at(hva(GFN + 1)) is not None
    assert read(c, GFN) == {6}


# ---------------------------------------------------------------- bugs
def test_window_neighbour_never_reads_garbage():
    o = oracle()
    observe_read(o, GFN, 0)  # exposes GFN+1 without touching it
    assert read(o, GFN + 1) == {0}


def test_window_neighbour_vmm_write_is_zero_or_value():
    o = oracle()
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN + 1), 5)
    assert read(o, GFN + 1) == {0, 5}


@pytest.mark.parametrize("detach", ["cow_break", "migrate"])
def test_ksm_state_agrees_with_host(detach):
    a, b = hva(GFN), hva(GFN + 1)
    o = oracle()
    host = HostMm(PhysicalMemory())
    host.mmap(HVA, HVA + 1024 * PAGE)
    host.fault_in(a, False)
    host.fault_in(b, False)
    assert o.can_ksm_merge(a, b)
    host.ksm_merge(a, b)
    o.host_op("ksm_merge", b, b + PAGE, other=a)
    if detach == "cow_break":  # the VMM writes a: COW break of a
        assert host.needs_cow(a, True)
        host.cow_break(a)
        o.vmm_write(a, 5)
    else:
        host.migrate(a)
        o.host_op("migrate", a, a + PAGE)
    for h in (a, b):
        assert (h in o.ksm) == host.pte(h).ksm, hex(h)


