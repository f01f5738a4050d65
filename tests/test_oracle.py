"""Tests for model.oracle, the executable specification (rules R1-R6 of its
docstring; DESIGN §3; rules §6.3-§6.5, §9.4)."""

import pytest

from conformance.protocol import Exit, Memslot, VmConfig
from model.cache import GARBAGE
from model.host import HostMm
from model.memory import PhysicalMemory
from model.oracle import EFAULT, MMIO, Oracle, Outcome
from oracle_helpers import (
    GFN, HVA, PAGE, RO_GFN, RO_HVA, caches_on, fetch, hva, observe_read, oracle, read,
    write)


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
    else:  # NC write below a possibly stale clean line (rules §6.1 hazard b)
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


# ------------------------------------------------------- R7: known findings
def test_adopting_a_stale_line_allows_it_and_what_lies_below():
    """block-split-no-cmo: the VMM read 0 above the guest's NC write of 5.
    From then on the page holds a clean line of 0 above 5 in memory, or (after
    a copy the host made from that line) 0 itself."""
    o = oracle()
    write(o, GFN, 5)  # caches off: NC write to PoC
    o.invalidate(hva(GFN), hva(GFN) + PAGE)
    assert o.vmm_read(hva(GFN)) == {5}  # G-C4: clean after the unmap
    o.adopt_stale_line(hva(GFN), 0)
    assert 0 in o.vmm_read(hva(GFN))
    assert read(o, GFN) == {0, 5}  # NC: memory holds 5, or the copy holds 0


def test_clone_keeps_the_vcpus_sctlr_and_tvm():
    """A clone is the same state (the parallel machine's linearizability
    search runs on clones): SCTLR_EL1 and TVM included."""
    o = oracle()
    caches_on(o, vcpu=1)
    c = o.clone()
    assert c.sctlr == o.sctlr and c.tvm_armed == o.tvm_armed
    assert c == o and c is not o
