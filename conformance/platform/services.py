"""Platform services: the candidate's only way to touch the world (DESIGN §4).

Addresses are physical (``pa``) or intermediate-physical (``ipa``) byte
addresses; a *ptep* is the physical address of an 8-byte descriptor
(``table_pa + 8 * index``), exactly as KVM's ``kvm_pte_t *`` would be.

Every method is a scheduling point for the parallel machine and is counted in
the cost counters shown by ``stage2-conformance matrix``. The mapping to the
kernel is given in each docstring; see ``docs/candidate-protocol.md``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from conformance.protocol import Memslot, VmConfig
from model.geometry import Geometry
from model.host import HostPage
from model.memory import TABLE_USES, PageUse


class Services:
    def __init__(self, platform):
        self._p = platform

    def _enter(self, name: str) -> None:
        self._p.count_service_call(name)

    # ------------------------------------------------------------- context
    @property
    def config(self) -> VmConfig:
        return self._p.config

    @property
    def geometry(self) -> Geometry:
        """IPA size, levels, start level and concatenated PGD pages (rules §1.1)."""
        return self._p.geometry

    @property
    def current_vcpu(self) -> int | None:
        """The vCPU whose exit is being handled, or ``None`` on a host thread."""
        return self._p.current_vcpu

    def memslots(self) -> tuple[Memslot, ...]:
        """The memslots (``kvm_memslots``), sorted by base gfn: inside a vCPU's
        exit handler the array it found when it entered its SRCU read-side
        section, else the current one."""
        self._enter("memslots")
        p = self._p
        return p.ctx.memslots if p.ctx.memslots is not None else p.memslot_view

    # ------------------------------------------------------- table pages
    def alloc_pgd(self) -> int:
        """``zalloc_pages_exact``: the (concatenated) PGD, installed in VTTBR_EL2.
        Returns its PA."""
        self._enter("alloc_pgd")
        p = self._p
        if p.pgd_pfn is not None:
            p.fail("table-lifecycle", "alloc_pgd() called while a PGD is installed")
        n = p.geometry.pgd_pages
        pfn = p.mem.alloc_table(PageUse.PGD, n)
        p.pgd_pfn = pfn
        span = 512 << {0: 39, 1: 30, 2: 21, 3: 12}[p.geometry.start_level]
        for i in range(n):
            p.reachable[pfn + i] = (i * span, p.geometry.start_level)
        p.counters["table pages allocated"] += n
        return pfn << 12

    def free_pgd(self, pgd_pa: int) -> None:
        """``free_pages_exact`` of the PGD (after ``kvm_pgtable_stage2_destroy``)."""
        self._enter("free_pgd")
        p = self._p
        pfn = pgd_pa >> 12
        if pfn != p.pgd_pfn:
            p.fail("table-lifecycle", f"free_pgd({pgd_pa:#x}) is not the installed PGD")
        for i in range(p.geometry.pgd_pages):
            p.table(pfn + i, "free_pgd")
            p.reachable.pop(pfn + i, None)
            p.mem.free(pfn + i)
            p.monitors.on_table_freed(pfn + i)
        p.pgd_pfn = None
        p.counters["table pages freed"] += p.geometry.pgd_pages

    def zalloc_page(self) -> int:
        """``mm_ops->zalloc_page`` from the vCPU memcache: a zeroed table page
        with refcount 1. Returns its PA."""
        self._enter("zalloc_page")
        self._p.counters["table pages allocated"] += 1
        return self._p.mem.alloc_table() << 12

    def get_page(self, pa: int) -> None:
        """``mm_ops->get_page``: +1 on the table page containing ``pa``."""
        self._enter("get_page")
        pfn = pa >> 12
        self._p.table(pfn, "get_page")
        self._p.mem.refcount[pfn] += 1

    def put_page(self, pa: int) -> None:
        """``mm_ops->put_page``: -1 on the table page containing ``pa``; at zero
        the page is freed (and must no longer be reachable or cached)."""
        self._enter("put_page")
        p = self._p
        pfn = pa >> 12
        p.table(pfn, "put_page")
        p.mem.refcount[pfn] -= 1
        if p.mem.refcount[pfn] == 0 and p.mem.page_use(pfn) is PageUse.PGD:
            p.fail("table-lifecycle", f"put_page() dropped the PGD page at PA "
                   f"{pfn << 12:#x} to refcount 0 (the PGD is freed by free_pgd only)")
        if p.mem.refcount[pfn] == 0:
            p.mem.free(pfn)
            p.counters["table pages freed"] += 1
            p.monitors.on_table_freed(pfn)

    def page_count(self, pa: int) -> int:
        """``mm_ops->page_count``."""
        self._enter("page_count")
        pfn = pa >> 12
        self._p.table(pfn, "page_count")
        return self._p.mem.refcount[pfn]

    # --------------------------------------------------------- descriptors
    def read_pte(self, ptep: int) -> int:
        """``READ_ONCE(*ptep)``."""
        # The hottest service (every walker visit): _enter and table() inlined.
        p = self._p
        p.count_service_call("read_pte")
        pfn = ptep >> 12
        if p.mem.use.get(pfn) in TABLE_USES:
            return p.mem.tables[pfn][(ptep & 0xFFF) >> 3]
        return p.table(pfn, "read_pte")[(ptep & 0xFFF) >> 3]

    def write_pte(self, ptep: int, new: int) -> None:
        """``WRITE_ONCE(*ptep, new)`` (plus the DSB ISHST that publishes it)."""
        p = self._p
        p.count_service_call("write_pte", ptep, new)
        # Judged on the value before the store, reported after it: a store
        # that also breaks break-before-make is reported as that, the more
        # specific failure.
        unlocked = p.monitors.plain_store_violation(ptep)
        p.store_pte(ptep, new)
        if unlocked:
            p.monitors.fail("locking", unlocked)

    def cmpxchg_pte(self, ptep: int, old: int, new: int) -> int:
        """``cmpxchg(ptep, old, new)``: returns the value found; the store
        happened iff it equals ``old``."""
        self._p.count_service_call("cmpxchg_pte", ptep, new)
        cur = self._p.table(ptep >> 12, "cmpxchg_pte")[(ptep & 0xFFF) >> 3]
        if cur == old:
            self._p.store_pte(ptep, new)
        return cur

    def xchg_pte(self, ptep: int, new: int) -> int:
        self._p.count_service_call("xchg_pte", ptep, new)
        return self._p.store_pte(ptep, new)

    # ------------------------------------------------------------------ TLBI
    def tlb_flush_vmid_ipa(self, ipa: int, level: int | None = None) -> None:
        """``__kvm_tlb_flush_vmid_ipa``: ``TLBI IPAS2E1IS`` with TTL=level
        (``None`` = TLBI_TTL_UNKNOWN) then ``VMALLE1IS``, on every CPU."""
        self._enter("tlb_flush_vmid_ipa")
        self._p.counters["tlbi: ipa broadcast"] += 1
        for tlb in self._p.tlbs:
            tlb.invalidate_ipa(ipa, level)

    def tlb_flush_vmid_ipa_nsh(self, ipa: int, level: int | None = None) -> None:
        """``__kvm_tlb_flush_vmid_ipa_nsh``: the same, on the current vCPU's CPU
        only (a host thread has no guest TLB context: nothing is invalidated)."""
        self._enter("tlb_flush_vmid_ipa_nsh")
        self._p.counters["tlbi: ipa local"] += 1
        vcpu = self._p.current_vcpu
        if vcpu is not None:
            self._p.tlbs[vcpu].invalidate_ipa(ipa, level)

    def tlb_flush_vmid_range(self, ipa: int, size: int) -> None:
        """``__kvm_tlb_flush_vmid_range``: ``TLBI RIPAS2E1IS`` (TTL unknown)."""
        self._enter("tlb_flush_vmid_range")
        self._p.counters["tlbi: range"] += 1
        for tlb in self._p.tlbs:
            tlb.invalidate_range(ipa, ipa + size)

    def tlb_flush_vmid(self) -> None:
        """``__kvm_tlb_flush_vmid``: ``TLBI VMALLS12E1IS``."""
        self._enter("tlb_flush_vmid")
        self._p.counters["tlbi: vmid"] += 1
        for tlb in self._p.tlbs:
            tlb.invalidate_all()

    # --------------------------------------------------- cache maintenance
    def dcache_clean_inval_poc(self, pa: int, size: int) -> None:
        """``__clean_dcache_guest_page``: DC CIVAC over ``[pa, pa+size)``."""
        self._enter("dcache_clean_inval_poc")
        from model import cache
        p = self._p
        p.monitors.before_clean(pa, pa + size)
        p.counters["bytes cleaned+invalidated"] += size
        p.cleaned.append((pa, pa + size))
        first, last = pa >> 12, (pa + size - 1) >> 12
        for pfn in _present(p.mem.lines, first, last):
            p.mem.set_line(pfn, cache.clean_inval(p.mem.lines[pfn]))
        p.drops.cleaned(first, last)

    def icache_inval_pou(self, pa: int, size: int) -> None:
        """``__invalidate_icache_guest_page``: IC IVAU over the range."""
        self._enter("icache_inval_pou")
        from model import cache
        p = self._p
        p.counters["icache invalidations"] += 1
        first, last = pa >> 12, (pa + size - 1) >> 12
        for pfn in _present(p.mem.lines, first, last):
            p.mem.set_line(pfn, cache.iinval(p.mem.lines[pfn]))

    def icache_inval_all_pou(self) -> None:
        """``icache_inval_all_pou``: IC IALLUIS."""
        self._enter("icache_inval_all_pou")
        from model import cache
        p = self._p
        p.counters["icache invalidations"] += 1
        for pfn, line in list(p.mem.lines.items()):
            p.mem.set_line(pfn, cache.iinval(line))

    def set_tvm(self, vcpu: int, armed: bool) -> None:
        """Set or clear HCR_EL2.TVM for ``vcpu`` (trap SCTLR_EL1 writes)."""
        self._enter("set_tvm")
        self._p.tvm[vcpu] = armed

    # ------------------------------------------------------------ the host
    def gup(self, hva: int, write: bool) -> HostPage | None:
        """``__gfn_to_pfn_memslot`` / ``__kvm_faultin_pfn``: fault the host page
        in (a write breaks copy-on-write, which raises MMU notifiers *now*) and
        take a reference. ``None`` means -EFAULT (no VMA, or a write to a
        read-only VMA). Must not be called with ``mmu_lock`` held."""
        self._enter("gup")
        p = self._p
        if p.mmu_lock.held_by(p.task_id()) is not None:
            p.fail("locking", "gup() called with mmu_lock held: GUP may sleep and "
                   "raise MMU notifiers, which take mmu_lock")
        p.counters["gup"] += 1
        return p.gup(hva, write)

    def release_page(self, pfn: int) -> None:
        """``kvm_release_pfn_clean`` / ``kvm_release_faultin_page``."""
        self._enter("release_page")
        try:
            self._p.host.put_page(pfn)
        except ValueError:
            self._p.fail("host-page-refs", f"release_page() of host page PA {pfn << 12:#x}, "
                         "which holds no GUP reference: the candidate drops a reference "
                         "gup() never gave it (rules §3.2 step 20, §9.5 N6)")

    def host_mapping_size(self, hva: int) -> int:
        """``get_user_mapping_size``: 2 MiB for a THP-mapped hva, else 4 KiB."""
        self._enter("host_mapping_size")
        return self._p.host.mapping_size(hva)

    # ---------------------------------------------------------- dirty logging
    def mark_page_dirty(self, slot: Memslot, gfn: int) -> None:
        """``mark_page_dirty_in_slot``."""
        self._enter("mark_page_dirty")
        if slot.is_logging and slot.id in self._p.dirty and slot.contains_gfn(gfn):
            self._p.dirty[slot.id].add(gfn)
            # The obligation of a writable install is met now, even if a
            # harvest clears the bit before the step quiesces.
            self._p.monitors.pending_dirty.discard((slot.id, gfn))

    def take_dirty_bitmap(self, slot: Memslot) -> frozenset[int]:
        """The generic half of ``KVM_GET_DIRTY_LOG``: atomically snapshot and
        clear the slot's bitmap (``xchg`` per word). The caller re-protects."""
        self._enter("take_dirty_bitmap")
        bits = self._p.dirty.get(slot.id, set())
        self._p.dirty[slot.id] = set()
        # Until get_dirty_log returns, a write to one of these pages is
        # reported by this harvest (the VMM copies the page afterwards).
        self._p.monitors.harvesting.setdefault(slot.id, set()).update(bits)
        return frozenset(bits)

    # ---------------------------------------------------- locks and RCU
    # mmu_lock is a rwlock with owners (qrwlock fairness); in a parallel step
    # a contended acquire parks the task, sequentially it is a deadlock.
    def write_lock(self) -> None:
        """``write_lock(&kvm->mmu_lock)``."""
        self._enter("write_lock")
        self._p.lock_op("write_lock")

    def write_unlock(self) -> None:
        """``write_unlock(&kvm->mmu_lock)``."""
        self._enter("write_unlock")
        self._p.lock_op("write_unlock")

    def read_lock(self) -> None:
        """``read_lock(&kvm->mmu_lock)``."""
        self._enter("read_lock")
        self._p.lock_op("read_lock")

    def read_unlock(self) -> None:
        """``read_unlock(&kvm->mmu_lock)``."""
        self._enter("read_unlock")
        self._p.lock_op("read_unlock")

    @contextlib.contextmanager
    def mmu_write_lock(self):
        self.write_lock()
        try:
            yield
        finally:
            self.write_unlock()

    @contextlib.contextmanager
    def mmu_read_lock(self):
        self.read_lock()
        try:
            yield
        finally:
            self.read_unlock()

    @contextlib.contextmanager
    def rcu_read_lock(self):
        """``rcu_read_lock()`` ... ``rcu_read_unlock()`` (a context manager;
        the unlock is the service :meth:`rcu_read_unlock`)."""
        self._enter("rcu_read_lock")
        self._p.lock_op("rcu_read_lock")
        try:
            yield
        finally:
            self.rcu_read_unlock()

    def rcu_read_unlock(self) -> None:
        """``rcu_read_unlock()``: leave the read-side critical section."""
        self._enter("rcu_read_unlock")
        self._p.lock_op("rcu_read_unlock")

    def call_rcu(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after a grace period (no earlier than the end of
        every read-side critical section that exists now)."""
        self._enter("call_rcu")
        self._p.queue_rcu(callback)

    def cpu_relax(self) -> None:
        """``cpu_relax()`` in a spin loop (e.g. waiting for another walker's
        LOCKED entry): in a parallel step, another task runs first."""
        self._enter("cpu_relax")
        p = self._p
        p.counters["cpu_relax spins"] += 1
        if p.in_task():
            p.scheduler.cpu_relax()
            p.resume()


def _present(lines: dict, first: int, last: int):
    if last - first < len(lines):
        return [pfn for pfn in range(first, last + 1) if pfn in lines]
    return [pfn for pfn in lines if first <= pfn <= last]
