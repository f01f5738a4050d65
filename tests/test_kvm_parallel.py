"""``kvm-parallel`` (candidates/kvm_parallel.py, docs/kvm-parallel.md): its
fast fault paths take no ``mmu_lock``, its unmap drops the lock between 1 GiB
chunks and stops when the root is gone, and broken variants of both are
caught by the suite on scripted programs."""

from __future__ import annotations

import pytest

from candidates.kvm_parallel import (
    SW_HOST_WRITABLE, KvmParallelCandidate, ParallelStage2PgTable, _unmap)
from candidates.pgtable import Stage2PgTable
from conformance.errors import PropertyViolation
from conformance.machines.parallel import OpSpec
from conformance.platform.core import Platform
from conformance.platform.scheduler import Preemption, Schedule
from conformance.protocol import FaultKind, Memslot, MemslotChange, VmConfig
from model import descriptors as d
from strategies.layouts import Layout, Vma

HVA = 0x4000_0000
MIB2 = 2 << 20
GFN = 0x40000
#: Two vCPUs, no FWB (so unmaps TLBI per page), hardware AF.
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=True, nr_vcpus=2)
#: One 2 MiB slot, not THP-backed (4 KiB pages), logging from birth; where=0
#: is gfn 0x40000.
LOGGING = Layout((Memslot(0, GFN, 512, HVA, log_dirty_pages=True),),
                 (Vma(HVA, HVA + (512 << 12) + MIB2, False),), "cold", False)
PLAIN = Layout((Memslot(0, GFN, 512, HVA),), (Vma(HVA, HVA + (512 << 12) + MIB2, False),),
               "cold", False)
LOCKS = {"read_lock", "write_lock", "mmu_read_lock", "mmu_write_lock"}


def write(vcpu=0, where=0):
    return ("guest_write", dict(vcpu=vcpu, where=where, pages=1))


def read(vcpu=0, where=0):
    return ("guest_read", dict(vcpu=vcpu, where=where, pages=1))


HARVEST = ("memslot_harvest", dict(which=0))
#: Write the page (translation fault: mapped writable, with SW0), harvest it
#: (write-protected, SW0 kept): the next write is a write-protection fault.
PROTECTED = (write(), HARVEST)


# ------------------------------------------------------------------ the spy
class _Recorder:
    """The candidate's services, recording ``(vcpu, service, args)`` of every
    call (a context manager such as ``mmu_read_lock`` under its own name)."""

    def __init__(self, svc, log):
        self._svc, self._log = svc, log

    def __getattr__(self, name):
        attr = getattr(self._svc, name)
        if not callable(attr):
            return attr

        def recorded(*args, **kwargs):
            self._log.append((self._svc.current_vcpu, name, args))
            return attr(*args, **kwargs)
        return recorded


class Spy(KvmParallelCandidate):
    """kvm-parallel with its service calls recorded; ``calls`` holds one
    ``(method, argument, [(vcpu, service, args), ...])`` per candidate call
    of interest."""

    def __init__(self, services, config):
        self.log: list = []
        self.calls: list = []
        super().__init__(_Recorder(services, self.log), config)

    def _traced(self, method, arg, fn, *args):
        start = len(self.log)
        try:
            return fn(*args)
        finally:
            self.calls.append((method, arg, self.log[start:]))

    def handle_guest_abort(self, vcpu, fault):
        return self._traced("handle_guest_abort", fault, super().handle_guest_abort,
                            vcpu, fault)

    def commit_memory_region(self, old, new, change):
        return self._traced("commit_memory_region", change, super().commit_memory_region,
                            old, new, change)

    def invalidate_range_start(self, rng):
        return self._traced("invalidate_range_start", rng, super().invalidate_range_start,
                            rng)

    def faults(self, kind: FaultKind):
        return [services for method, fault, services in self.calls
                if method == "handle_guest_abort" and fault.kind is kind]


def names(services):
    return [name for _vcpu, name, _args in services]


def _play(play, cls, *steps, config=CONFIG, layout=LOGGING, machine="sequential"):
    failure, machine = play(cls, config, layout, *steps, machine=machine)
    return failure, machine, machine.platform.candidate


# ============================================================ fast paths
def test_a_write_protection_fault_is_fixed_without_mmu_lock_and_with_a_local_tlbi(play):
    failure, machine, spy = _play(play, Spy, *PROTECTED, write(), HARVEST)
    assert failure is None, str(failure)
    [fast] = spy.faults(FaultKind.PERMISSION)
    called = names(fast)
    assert not LOCKS & set(called) and "gup" not in called, called
    assert "rcu_read_lock" in called
    # the relaxation, then this CPU's TLBI of the IPA at the leaf's level, then
    # the dirty mark (after the writable install, before the vCPU resumes)
    store = called.index("cmpxchg_pte")
    tlbi = called.index("tlb_flush_vmid_ipa_nsh")
    assert store < tlbi < called.index("mark_page_dirty")
    assert fast[tlbi][2] == (GFN << 12, 3)
    _ptep, old, new = fast[store][2]
    assert old & SW_HOST_WRITABLE and not old & d.S2AP_W and new == old | d.S2AP_W
    assert machine.platform.counters["faults: permission"] == 1
    # (the second harvest reported the write: the oracle checks it)


def test_an_access_flag_fault_is_fixed_without_mmu_lock_and_without_a_tlbi(play):
    """Without hardware AF: clear_flush_young clears AF and flushes, so the
    next access walks to an AF=0 leaf and takes an access-flag fault."""
    config = VmConfig(ipa_bits=40, fwb=False, hw_af=False, nr_vcpus=2)
    aging = ("host_aging", dict(op="clear_flush_young", where=0, huge=False))
    failure, machine, spy = _play(play, Spy, read(), aging, read(), config=config,
                                  layout=PLAIN)
    assert failure is None, str(failure)
    [fast] = spy.faults(FaultKind.ACCESS_FLAG)
    called = names(fast)
    assert not LOCKS & set(called) and "gup" not in called, called
    assert "rcu_read_lock" in called and "cmpxchg_pte" in called
    assert not [n for n in called if n.startswith("tlb_flush")]  # AF=0 is never cached
    [(_ptep, old, new)] = [args for _v, name, args in fast if name == "cmpxchg_pte"]
    assert new == old | d.AF and old != new


def test_a_page_mapped_read_only_by_the_host_is_never_relaxed_without_gup(play):
    """The host-writable bit decides: a page read-faulted while the VMA was
    read-only has no SW0, so after mprotect back to read-write (no zap,
    rules §5.4) its write fault goes through GUP and the read lock, which
    then sets SW0."""
    mprotect = [("host_mm", dict(op=op, where=0, huge=False))
                for op in ("mprotect_ro", "mprotect_rw")]
    failure, machine, spy = _play(play, Spy, mprotect[0], read(), mprotect[1], write(),
                                  layout=PLAIN)
    assert failure is None, str(failure)
    [slow] = spy.faults(FaultKind.PERMISSION)
    called = names(slow)
    assert "gup" in called and "mmu_read_lock" in called, called
    [(_ptep, old, new)] = [args for _v, name, args in slow if name == "cmpxchg_pte"]
    assert not old & SW_HOST_WRITABLE  # mapped while the host page was read-only
    assert new == old | d.S2AP_W | SW_HOST_WRITABLE  # relax_perms after GUP sets it


def test_a_block_in_a_logging_slot_takes_the_classic_path(play):
    """A read-only 2 MiB block with SW0 in a slot that now logs must be split
    (rules §4.3, §9.4 D5): not eligible for the fast path."""
    thp = Layout((Memslot(0, GFN, 512, HVA),), (Vma(HVA, HVA + (512 << 12) + MIB2, True),),
                 "cold", False)
    logging_on = ("memslot_logging", dict(which=0, on=True))
    failure, machine, spy = _play(play, Spy, write(), logging_on, write(where=1),
                                  layout=thp)
    assert failure is None, str(failure)
    [slow] = spy.faults(FaultKind.PERMISSION)
    assert "gup" in names(slow) and "mmu_read_lock" in names(slow)
    # map(4 KiB) broke the block (TLBI at level 2) for a new level-3 table
    assert [a for _v, n, a in slow if n == "tlb_flush_vmid_ipa" and a[1] == 2]
    assert "zalloc_page" in names(slow)


# ====================================================== resumable unmap
#: A 4 MiB slot whose gfn range crosses the 1 GiB IPA boundary at gfn 0x40000
#: (2 MiB below it, 2 MiB above); where=2 is gfn 0x3ffff, where=3 gfn 0x40000.
ACROSS = Layout((Memslot(0, 0x3FE00, 1024, HVA),),
                (Vma(HVA, HVA + (1024 << 12) + MIB2, False),), "cold", False)
#: The same, but with the hva one MiB off, so that the host's 2 MiB window at
#: hva 0x40000000 backs gfns 0x3ff00-0x400ff, across the boundary; where=0 is
#: gfn 0x3ff00, where=5 gfn 0x40005.
ACROSS_MISALIGNED = Layout((Memslot(0, 0x3FF00, 1024, HVA),),
                           (Vma(HVA, HVA + (1024 << 12) + MIB2, True),), "cold", False)


@pytest.mark.parametrize("layout, steps, method", [
    (ACROSS, (write(where=2), write(where=3), ("memslot", dict(op="delete", which=0))),
     "commit_memory_region"),
    (ACROSS_MISALIGNED, (write(where=0), write(where=5),
                         ("host_mm", dict(op="madvise_dontneed", where=0, huge=True))),
     "invalidate_range_start"),
], ids=["memslot-delete", "notifier"])
@pytest.mark.parametrize("ipa_bits", [40, 32])
def test_the_unmap_drops_mmu_lock_between_1gib_chunks(play, layout, steps, method, ipa_bits):
    config = VmConfig(ipa_bits=ipa_bits, fwb=False, hw_af=True, nr_vcpus=2)
    failure, machine, spy = _play(play, Spy, *steps, config=config, layout=layout)
    assert failure is None, str(failure)  # and nothing maps the range afterwards
    [services] = [s for m, arg, s in spy.calls
                  if m == method and arg is not MemslotChange.CREATE]
    called = names(services)
    i = called.index("cpu_relax")
    assert called[i - 1:i + 2] == ["write_unlock", "cpu_relax", "write_lock"]
    assert called.count("cpu_relax") == 1  # two chunks, one reschedule
    # the page below 1 GiB is unmapped and invalidated (a TLBI each without
    # FWB) before the lock is dropped, the one above after it is retaken
    flushes = [(n, args[0]) for n, (_v, name, args) in enumerate(services)
               if name == "tlb_flush_vmid_ipa"]
    before = [ipa for n, ipa in flushes if n < i]
    after = [ipa for n, ipa in flushes if n > i]
    assert before and after, called
    assert max(before) < 1 << 30 <= min(after)


def _bare_platform(cls=KvmParallelCandidate):
    """A platform as the machine boots it, with the slot of ``ACROSS``."""
    p = Platform(CONFIG)
    p.host_mmap(HVA, HVA + (1024 << 12) + MIB2, False)
    p.step = "boot"
    p.candidate = p.construct(cls)
    for vcpu in range(2):
        p.call("vcpu_init", vcpu, vcpu=vcpu)
    slot = Memslot(0, 0x3FE00, 1024, HVA)
    p.set_memslot(None, slot, MemslotChange.CREATE)
    for gfn in (0x3FFFF, 0x40000):
        assert p.guest_access(0, gfn << 12, "write", gfn).value == gfn
    return p, slot


def test_the_chunk_loop_stops_when_release_detached_the_root():
    """``release`` runs while the unmap has dropped the lock between chunks
    (exit_mmap: the VMID is retired, the root detached and, after a grace
    period, destroyed): the loop re-reads the root after retaking the lock
    and stops with -EINVAL instead of walking freed tables (rules §5.3, L4)."""
    p, slot = _bare_platform()
    cand, svc = p.candidate, p.services
    chunks = []

    def fn(pgt, addr, size):
        chunks.append((addr, size))
        return _unmap(pgt, addr, size)

    svc.cpu_relax = p.exit_mmap  # what another CPU does while we are rescheduling
    with svc.mmu_write_lock():
        ret = cand.stage2_apply_range(slot.base_gfn << 12, slot.end_gfn << 12, fn)
    assert ret == -22 and cand.pgt is None
    assert chunks == [(0x3FE0_0000, 0x20_0000)]  # the second chunk was never walked
    assert p.pgd_pfn is None  # destroyed after its grace period
    del svc.cpu_relax
    p.destroy()  # no leaks


def test_a_chunk_loop_that_keeps_the_stale_root_is_caught():
    """The 2017 bug (rules §8 bug 1): the same release, but the loop keeps
    using the root it read before dropping the lock. (``destroy`` sets the
    Python object's ``pgd`` to None; in C the stale pointer still holds the
    freed PGD's address, which is what the variant keeps.)"""
    class FreedPgdKeepsItsAddress(ParallelStage2PgTable):
        def destroy(self):
            pgd = self.pgd
            super().destroy()
            self.pgd = pgd

    class StaleRoot(KvmParallelCandidate):
        pgtable_cls = FreedPgdKeepsItsAddress

        def stage2_apply_range(self, addr, end, fn):
            pgt, boundary = self.pgt, 1 << 30  # BUG: the root is read once
            fn(pgt, addr, boundary - addr)
            self.cond_resched_rwlock_write()
            return fn(pgt, boundary, end - boundary)

    p, slot = _bare_platform(StaleRoot)
    p.services.cpu_relax = p.exit_mmap
    with pytest.raises(PropertyViolation) as exc:
        with p.services.mmu_write_lock():
            p.candidate.stage2_apply_range(slot.base_gfn << 12, slot.end_gfn << 12, _unmap)
    assert exc.value.property == "table-lifecycle" and "after it was freed" in \
        exc.value.message


# ================================================================ races
def _parallel(ops, schedule, where=0):
    return ("parallel", dict(where=where, ops=ops, schedule=schedule))


#: vCPU0's write-protection fault and the notifier of a migration of the
#: same page; vCPU0 is preempted just before its cmpxchg, after it read the
#: read-only leaf under RCU: the notifier unmaps the page meanwhile.
FAST_VS_MIGRATE = _parallel((OpSpec("write", 0), OpSpec("invalidate", host_op="migrate")),
                            Schedule((Preemption(0, 1, "pte store", 1),)))


def test_a_fast_write_fault_racing_a_notifier_invalidation_passes(play):
    failure, machine, spy = _play(play, Spy, *PROTECTED, FAST_VS_MIGRATE, read(),
                                  machine="parallel")
    assert failure is None, str(failure)
    assert "parallel: a preemption fired" in machine.events
    # the fast path lost the cmpxchg (the entry was gone), invalidated its
    # own TLB with the level unknown, and the refault took the slow path
    [lost, *_] = spy.faults(FaultKind.PERMISSION)
    assert ("tlb_flush_vmid_ipa_nsh", (GFN << 12, None)) in \
        [(name, args) for _v, name, args in lost]
    refault = spy.faults(FaultKind.TRANSLATION)[-1]
    assert "gup" in names(refault)


#: vCPU0's write-protection fault is preempted before its third read_pte,
#: the level-3 entry (a 40-bit VM starts at level 1): it is inside the L3
#: table when the notifier unmaps the table's only page and prunes it.
INSIDE_A_PRUNED_TABLE = _parallel(
    (OpSpec("write", 0), OpSpec("invalidate", host_op="madvise_dontneed")),
    Schedule((Preemption(0, 3, "read_pte", 1),)))


class PruneFreesAtOnce(KvmParallelCandidate):
    """Broken: kvm-classic's unmap, which frees a pruned table at once; fine
    under mmu_lock, a use after free for a fault walking without it."""

    class pgtable_cls(ParallelStage2PgTable):
        def unmap(self, addr, size):
            svc = self.svc
            real = svc.call_rcu
            svc.call_rcu = lambda callback: callback()
            try:
                return super().unmap(addr, size)
            finally:
                svc.call_rcu = real


def test_a_pruned_table_outlives_a_fast_fault_inside_it(play):
    failure, machine, spy = _play(play, Spy, *PROTECTED, INSIDE_A_PRUNED_TABLE,
                                  machine="parallel")
    assert failure is None, str(failure)
    assert "parallel: a preemption fired" in machine.events
    # the fast walk found the entry gone (not eligible): the slow path took over
    [fast, *_] = spy.faults(FaultKind.PERMISSION)
    assert "gup" in names(fast)
    assert machine.platform.counters["rcu callbacks"] >= 2  # the L3 and L2 tables


def test_a_pruned_table_freed_at_once_is_caught(play):
    failure, _, _ = _play(play, PruneFreesAtOnce, *PROTECTED, INSIDE_A_PRUNED_TABLE,
                          machine="parallel")
    assert isinstance(failure, PropertyViolation), failure
    # a use after free by the fault's walker, or (a monitor that sees it
    # earlier) a free while that walker's RCU section is still open
    assert failure.property == "table-lifecycle" and "freed" in failure.message, str(failure)


# ============================================== the tests can fail
class FastPathWithoutTlbi(KvmParallelCandidate):
    """Broken: the x86 way, no TLBI after the lockless relaxation. arm64 may
    keep the read-only entry that faulted (rules §1.5 rule 1): the vCPU
    re-takes the same fault for ever."""

    def fast_page_fault(self, fault, slot):
        svc = self.services
        real = svc.tlb_flush_vmid_ipa_nsh
        svc.tlb_flush_vmid_ipa_nsh = lambda ipa, level=None: None
        try:
            return super().fast_page_fault(fault, slot)
        finally:
            svc.tlb_flush_vmid_ipa_nsh = real


def test_the_fast_path_without_its_tlbi_is_caught(play):
    """The program of the first test, with vCPU0 reading the page before it
    writes, so that its TLB holds the read-only entry."""
    steps = (*PROTECTED, read(), write())
    failure, _, _ = _play(play, KvmParallelCandidate, *steps)
    assert failure is None, str(failure)
    failure, _, _ = _play(play, FastPathWithoutTlbi, *steps)
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "forward-progress", str(failure)


# ======================================= aging against a lockless writer
def _parallel_aging():
    from conformance.machines.parallel import ParallelMachine

    if not hasattr(ParallelMachine, "_plan_age"):
        pytest.skip("this parallel machine has no aging operation")


#: clear_young (under the write lock) is preempted just before its store,
#: after it read the read-only, young leaf; vCPU0's fast write fault then
#: relaxes that leaf without mmu_lock.
AGING_VS_FAST = _parallel((OpSpec("age", host_op="clear_young"), OpSpec("write", 0)),
                          Schedule((Preemption(0, 1, "pte store", 1),)))


class AgingWithAPlainStore(KvmParallelCandidate):
    """Broken: kvm-classic's aging walker, a plain store of ``old & ~AF``,
    right under mmu_lock, but it undoes a fast fault's relaxation."""

    class pgtable_cls(ParallelStage2PgTable):
        test_clear_young = Stage2PgTable.test_clear_young


def test_aging_clears_only_af_under_a_concurrent_fast_relaxation(play):
    _parallel_aging()
    failure, machine, spy = _play(play, Spy, *PROTECTED, AGING_VS_FAST, write(),
                                  machine="parallel")
    assert failure is None, str(failure)
    assert "parallel: a preemption fired" in machine.events
    assert spy.faults(FaultKind.PERMISSION)  # the fast path ran inside the window
    failure, _, _ = _play(play, AgingWithAPlainStore, *PROTECTED, AGING_VS_FAST,
                          machine="parallel")
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "aging", str(failure)
