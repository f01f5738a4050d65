"""``kvm-classic``: a single-threaded candidate that follows KVM/arm64 v6.x.

What it does, in the reference's terms:

* page tables through a ``kvm_pgtable``-style walker (:mod:`candidates.pgtable`):
  break-before-make with the LOCKED marker, table→block collapse with an
  RCU-deferred free of the old subtree, block→table on map when a leaf is not
  allowed (the rest of the block faults back lazily) (§2);
* the fault path of ``user_mem_abort`` (§3.1-§3.4): 2 MiB blocks for
  THP-backed, congruent memslots; 4 KiB ``force_pte`` while logging; read
  faults on logging slots map read-only; pages become executable on the first
  instruction fetch unless CTR_EL0.DIC; permission faults whose granule
  matches are fixed by ``relax_perms`` (no BBM, local TLBI); access-flag
  faults by ``mkyoung``;
* dirty logging (§4): write-protect + one range TLBI when logging is
  enabled (optionally eager splitting, :attr:`ClassicCandidate.eager_split`);
  nothing when it is disabled (blocks come back by collapse on later faults);
  harvests re-protect the reported pages and flush once;
* MMU notifiers (§5): unmap on every event except the 2023 proposal's
  PROTECTION_UPGRADE (KVM must not zap on upgrades, §5.4); release detaches
  the page table under the write lock, then destroys it;
* cache maintenance (§6): clean+invalidate to PoC of new cacheable leaves and
  after unmap (not with FWB), I-cache invalidation before a leaf becomes
  executable (not with DIC, where IC IVAU is a no-op), TVM armed at vCPU init
  without FWB, ``stage2_flush_vm`` on SCTLR_EL1.{M,C} toggles and on the
  first set/way op.
"""

from __future__ import annotations

from candidates.common import KvmBase
from candidates.pgtable import EAGAIN, HANDLE_FAULT, SHARED, Stage2PgTable
from conformance.protocol import (
    PAGE_SIZE, SCTLR_C, SCTLR_M, Capabilities, Exit, FaultKind, GuestAbort, Memslot,
    MemslotChange, NotifierEvent, NotifierRange, SysReg)
from model import descriptors as d
from model.geometry import granule

PMD_SIZE = 2 << 20
CACHES_ON = SCTLR_M | SCTLR_C


def fault_supports_stage2_huge_mapping(slot: Memslot, hva: int, size: int) -> bool:
    """Rules §3.3: gfn/hva congruent modulo ``size`` and the ``size``-aligned
    window around ``hva`` inside the memslot's userspace range."""
    if size == PAGE_SIZE:
        return True
    if (slot.base_gfn << 12) % size != slot.userspace_addr % size:
        return False
    base = hva & ~(size - 1)
    return base >= slot.userspace_addr and base + size <= slot.hva_end


class ClassicCandidate(KvmBase):
    capabilities = Capabilities(concurrent=True, fwb=True, hw_af=True, dic=True,
                                max_vcpus=4, block_mappings=True)
    version = "kvm-arm64-v6.12-classic/1"
    #: ``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE`` != 0: split blocks to 4K right after
    #: write-protecting a slot whose logging is enabled (rules §4.2).
    eager_split = False
    #: v6.12 drops the rest of a block it splits at map time without CMO
    #: (rules §6.6): kept on purpose, reported as a finding (docs/findings.md).
    known_findings = frozenset({"block-split-no-cmo"})
    #: The page-table library (``struct kvm_pgtable`` and its operations).
    pgtable_cls = Stage2PgTable

    def __init__(self, services, config):
        super().__init__(services, config)
        self.pgt: Stage2PgTable | None = self.pgtable_cls(services)
        self.tvm: dict[int, bool] = {}  # our record of HCR_EL2.TVM per vCPU

    # ================================================ vCPUs and caches (§6)
    def vcpu_init(self, vcpu: int) -> None:
        armed = not self.config.fwb
        self.tvm[vcpu] = armed
        if armed:
            self.services.set_tvm(vcpu, True)

    def handle_sysreg_write(self, vcpu: int, reg: SysReg, old: int, new: int) -> None:
        """``access_vm_reg`` + ``kvm_toggle_cache`` (§6.3)."""
        if reg is not SysReg.SCTLR_EL1:
            return
        was_on = old & CACHES_ON == CACHES_ON
        now_on = new & CACHES_ON == CACHES_ON
        if was_on != now_on:
            self.stage2_flush_vm()
        if now_on:
            self.tvm[vcpu] = False
            self.services.set_tvm(vcpu, False)

    def handle_set_way(self, vcpu: int) -> None:
        """``kvm_set_way_flush`` (§6.4): ignored with FWB; else flush on the
        first op and arm TVM so that the following SCTLR toggle is caught."""
        if self.config.fwb:
            return
        if not self.tvm.get(vcpu, False):
            self.stage2_flush_vm()
            self.tvm[vcpu] = True
            self.services.set_tvm(vcpu, True)

    def stage2_flush_vm(self) -> None:
        svc = self.services
        with svc.mmu_write_lock():
            if self.pgt is None:
                return
            for slot in svc.memslots():
                self.pgt.flush(slot.base_gfn << 12, slot.npages << 12)

    # ================================================== the fault path (§3)
    def handle_guest_abort(self, vcpu: int, fault: GuestAbort) -> Exit:
        """``kvm_handle_guest_abort`` (§3.1)."""
        slot = self.gfn_to_memslot(fault.gfn)
        write_fault = fault.is_write_fault
        if slot is None or (write_fault and slot.readonly):
            return Exit.MMIO
        if fault.kind is FaultKind.ACCESS_FLAG:
            return self.handle_access_fault(fault)
        return self.user_mem_abort(fault, slot)

    def handle_access_fault(self, fault: GuestAbort) -> Exit:
        """§3.6: mkyoung under the read lock, no TLBI."""
        with self.services.mmu_read_lock():
            if self.pgt is not None:
                self.pgt.mkyoung(fault.ipa)
        return Exit.RESUME

    def user_mem_abort(self, fault: GuestAbort, slot: Memslot) -> Exit:
        """§3.2 step by step."""
        svc = self.services
        perm = fault.kind is FaultKind.PERMISSION
        write_fault, exec_fault = fault.is_write_fault, fault.is_exec_fault
        if perm and not write_fault and not exec_fault:
            return Exit.EFAULT  # "unexpected L2 read permission error"
        fault_granule = granule(fault.level) if perm else PAGE_SIZE
        logging = slot.is_logging
        force_pte = logging
        vma_pagesize = PAGE_SIZE
        hva = slot.gfn_to_hva(fault.gfn)

        seq = self.mmu_invalidate_seq  # step 9: before GUP
        page = svc.gup(hva, write_fault)
        if page is None:
            return Exit.EFAULT
        writable = page.writable and not slot.readonly
        if logging and not write_fault:
            writable = False  # map RO so that the first write is caught (§4.3)
        prot = d.Prot.R
        if writable:
            prot |= d.Prot.W
        if exec_fault or self.config.dic:
            prot |= d.Prot.X

        ipa, pfn = fault.ipa, page.pfn
        try:
            with svc.mmu_read_lock():
                if self.pgt is None:
                    return Exit.EFAULT  # the mm is gone: the VM cannot run
                if self.mmu_invalidate_retry(seq):
                    return Exit.RESUME
                # step 15: size refinement
                if vma_pagesize == PAGE_SIZE and not force_pte:
                    if perm and fault_granule > PAGE_SIZE:
                        vma_pagesize = fault_granule
                    elif (fault_supports_stage2_huge_mapping(slot, hva, PMD_SIZE)
                          and svc.host_mapping_size(hva) >= PMD_SIZE):
                        vma_pagesize = PMD_SIZE  # transparent_hugepage_adjust (§3.4)
                        ipa &= ~(PMD_SIZE - 1)
                        pfn &= ~((PMD_SIZE >> 12) - 1)
                if perm and vma_pagesize == fault_granule:
                    ret = self.pgt.relax_perms(fault.ipa, prot)
                else:
                    ret = self.pgt.map(ipa, vma_pagesize, pfn << 12, prot,
                                       flags=SHARED | HANDLE_FAULT, force_pte=force_pte)
                if writable and logging and ret == 0:
                    svc.mark_page_dirty(slot, fault.gfn)
                if ret not in (0, EAGAIN):
                    raise RuntimeError(f"stage-2 install failed: {ret}")
                return Exit.RESUME
        finally:
            self.release_faultin_page(page, pfn)

    def release_faultin_page(self, page, pfn: int) -> None:
        """Step 20: drop the reference GUP took, on ``page`` (``pfn`` is what
        was mapped: the 2 MiB head after THP adjustment, which holds none;
        the stage-2 mapping itself holds no page reference, §9.5 N6)."""
        self.services.release_page(page.pfn)

    # ===================================================== notifiers (§5)
    def invalidate_range_start(self, rng: NotifierRange) -> None:
        if rng.event is NotifierEvent.PROTECTION_UPGRADE:
            return  # no KVM-visible obligation: never zap on upgrades (§5.4)
        super().invalidate_range_start(rng)

    def invalidate_range_end(self, rng: NotifierRange) -> None:
        if rng.event is NotifierEvent.PROTECTION_UPGRADE:
            return  # mirrors invalidate_range_start
        super().invalidate_range_end(rng)

    def unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> None:
        """``kvm_unmap_gfn_range`` (write lock held by the caller)."""
        if self.pgt is not None:
            self.pgt.unmap(start << 12, (end - start) << 12)

    def age_gfn_range(self, slot: Memslot, start: int, end: int, mkold: bool) -> bool:
        if self.pgt is None:
            return False
        return self.pgt.test_clear_young(start << 12, (end - start) << 12, mkold)

    def release(self) -> None:
        """``kvm_free_stage2_pgd``: detach under the write lock, destroy outside."""
        with self.services.mmu_write_lock():
            pgt, self.pgt = self.pgt, None
        if pgt is not None:
            pgt.destroy()

    def destroy(self) -> None:
        self.release()

    # ========================================= memslots and dirty logging (§4)
    def commit_memory_region(self, old: Memslot | None, new: Memslot | None,
                             change: MemslotChange) -> None:
        if change in (MemslotChange.DELETE, MemslotChange.MOVE):
            self.flush_shadow_memslot(old)
        if change is MemslotChange.DELETE or new is None:
            return
        if new.is_logging and not (old is not None and old.is_logging):
            self.enable_logging(new)
        elif old is not None and old.is_logging and not new.is_logging:
            self.disable_logging(new)

    def flush_shadow_memslot(self, old: Memslot) -> None:
        """``kvm_arch_flush_shadow_memslot``: unmap the old slot's range."""
        with self.services.mmu_write_lock():
            if self.pgt is not None:
                self.pgt.unmap(old.base_gfn << 12, old.npages << 12)

    def enable_logging(self, slot: Memslot) -> None:
        """§4.2: write-protect, flush the slot's range, then (optionally) split."""
        svc = self.services
        start, size = slot.base_gfn << 12, slot.npages << 12
        with svc.mmu_write_lock():
            if self.pgt is None:
                return
            self.pgt.wrprotect(start, size)
        svc.tlb_flush_vmid_range(start, size)  # kvm_flush_remote_tlbs_memslot
        if self.eager_split:
            with svc.mmu_write_lock():
                if self.pgt is not None:
                    self.pgt.split(start, size)

    def disable_logging(self, slot: Memslot) -> None:
        """§4.6: nothing; huge mappings come back lazily by collapse."""

    def get_dirty_log(self, slot: Memslot) -> frozenset[int]:
        """``kvm_get_dirty_log_protect`` (§4.4)."""
        svc = self.services
        dirty = svc.take_dirty_bitmap(slot)
        if dirty:
            with svc.mmu_write_lock():
                if self.pgt is not None:
                    for start, npages in _runs(sorted(dirty)):
                        self.pgt.wrprotect(start << 12, npages << 12)
            svc.tlb_flush_vmid_range(slot.base_gfn << 12, slot.npages << 12)
        return frozenset(dirty)


def _runs(gfns):
    """Contiguous runs ``(first gfn, count)`` of a sorted list of gfns."""
    out: list[tuple[int, int]] = []
    for g in gfns:
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((g, 1))
    return out


class ClassicEagerSplitCandidate(ClassicCandidate):
    """``kvm-classic-eager-split``: the VMM set
    ``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE``, so enabling dirty logging splits
    every block of the slot into pages at once (``kvm_mmu_split_memory_region``,
    §4.2) instead of on the next write fault. Fewer faults while logging; every
    later unmap of the split range pays a TLBI per 4 KiB page unless unmap
    TLBIs are deferred (FWB + FEAT_TLBIRANGE, §2.5)."""

    version = "kvm-arm64-v6.12-classic-eager-split/1"
    eager_split = True


class SplitCleaningPgTable(Stage2PgTable):
    """``kvm_pgtable`` whose map walker cleans+invalidates the whole old block
    when it breaks a cacheable block to install a table without FWB (the fix
    rules §6.6 and docs/findings.md propose)."""

    clean_broken_block = True


class ClassicSplitCmoCandidate(ClassicCandidate):
    """``kvm-classic-split-cmo``: kvm-classic with the fix for the finding
    block-split-no-cmo: a write fault that splits a block at map time
    cleans+invalidates the old block's 2 MiB to PoC (without FWB) after the
    break, so the pages it drops leave no stale line behind. Costs a 2 MiB CMO
    per split, the price of a first block map."""

    version = "kvm-arm64-v6.12-classic-split-cmo/1"
    known_findings = frozenset()
    pgtable_cls = SplitCleaningPgTable

