"""A minimal correct stage-2 candidate (docs/candidate-protocol.md).

4 KiB pages only, one mmu_lock writer at a time, KVM's policies otherwise:
read faults on a logging slot map read-only, pages become executable on the
first instruction fetch (or at once with CTR_EL0.DIC), TVM is armed at vCPU
init and dropped once the guest runs with its caches on.
"""

from __future__ import annotations

from candidates.common import KvmBase, PageTable
from conformance.protocol import (
    PAGE_SIZE, SCTLR_C, SCTLR_M, Capabilities, Exit, FaultKind, GuestAbort,
    Memslot, MemslotChange)
from model import descriptors as d

CACHES_ON = SCTLR_M | SCTLR_C


class MinimalCandidate(KvmBase):
    capabilities = Capabilities(concurrent=False, fwb=True, hw_af=True, dic=True,
                                max_vcpus=4, block_mappings=False)
    version = "1"

    def __init__(self, services, config):
        super().__init__(services, config)  # mmu_invalidate_seq / _in_progress
        self.pgt: PageTable | None = PageTable(services)  # allocates the PGD
        self.tvm: dict[int, bool] = {}

    # ----------------------------------------------------------- the fault path
    def handle_guest_abort(self, vcpu: int, fault: GuestAbort) -> Exit:
        svc = self.services
        write = fault.is_write_fault
        # kvm_handle_guest_abort: no memslot, or a write to a read-only
        # memslot, is MMIO for the VMM (rules §3.1 step 7).
        slot = self.gfn_to_memslot(fault.gfn)
        if slot is None or (write and slot.readonly):
            return Exit.MMIO
        if fault.kind is FaultKind.ACCESS_FLAG:
            return self.handle_access_fault(fault)

        # user_mem_abort (rules §3.2). Snapshot the invalidation sequence
        # *before* GUP: GUP may sleep, and may itself raise MMU notifiers.
        mmu_seq = self.mmu_invalidate_seq
        page = svc.gup(slot.gfn_to_hva(fault.gfn), write)
        if page is None:
            return Exit.EFAULT  # no VMA, or a write to a read-only VMA
        writable = page.writable and not slot.readonly
        if slot.is_logging and not write:
            writable = False  # map read-only so that the first write is seen

        with svc.mmu_write_lock():
            # An invalidation that started or finished since the snapshot may
            # have covered this page: drop everything and let the guest refault.
            if not self.mmu_invalidate_retry(mmu_seq):
                ptep, old, _ = self.pgt.lookup(fault.ipa, alloc_to=3)
                prot = d.Prot.R
                if writable:
                    prot |= d.Prot.W
                if fault.is_exec_fault or self.config.dic:
                    prot |= d.Prot.X
                if d.is_valid(old) and d.pte_pa(old) == page.pfn << 12:
                    # A permission fault: keep what the leaf already grants.
                    prot |= d.pte_prot(old, self.config.fwb)
                new = d.make_leaf(page.pfn << 12, 3, prot, self.config.fwb)
                self.install(ptep, old, new, fault.ipa)
                if slot.is_logging and new & d.S2AP_W:
                    svc.mark_page_dirty(slot, fault.gfn)  # before the vCPU resumes
        svc.release_page(page.pfn)  # the stage-2 mapping holds no page reference
        return Exit.RESUME

    def install(self, ptep: int, old: int, new: int, ipa: int) -> None:
        """Break-before-make of a 4 KiB leaf (rules §2.4), with the cache
        maintenance done while the entry is invalid (rules §6.2)."""
        svc = self.services
        if d.is_valid(old):
            svc.write_pte(ptep, 0)  # break
            svc.tlb_flush_vmid_ipa(ipa, 3)  # TLBI IPAS2E1IS + VMALLE1IS
            svc.put_page(ptep)  # the entry no longer counts on its table
            if not self.config.fwb:
                svc.dcache_clean_inval_poc(d.pte_pa(old), PAGE_SIZE)  # G-C4
        executable = not new & d.XN
        # G-C1; nothing to do with FWB, which implies IDC (oracle.md §3).
        if not self.config.fwb:
            svc.dcache_clean_inval_poc(d.pte_pa(new), PAGE_SIZE)
        if executable and not self.config.dic:
            svc.icache_inval_pou(d.pte_pa(new), PAGE_SIZE)  # G-C2
        svc.write_pte(ptep, new)  # make
        svc.get_page(ptep)

    def handle_access_fault(self, fault: GuestAbort) -> Exit:
        """``kvm_pgtable_stage2_mkyoung`` (rules §3.6): set AF in place; an
        AF=0 entry is never in a TLB, so no TLBI is needed."""
        with self.services.mmu_write_lock():
            ptep, pte, level = self.pgt.lookup(fault.ipa)
            if d.is_valid(pte) and not pte & d.AF:
                self.services.write_pte(ptep, pte | d.AF)
        return Exit.RESUME  # if it was unmapped meanwhile, the guest refaults

    # ------------------------------------------------------- MMU notifiers
    # KvmBase.invalidate_range_start/_end keep mmu_invalidate_seq and
    # mmu_invalidate_in_progress under the write lock and call this for every
    # memslot part backed by the range; aging calls age_gfn_range.
    def unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> None:
        if self.pgt is not None:  # nothing left after release()
            self.pgt.unmap(start << 12, end << 12)  # TLBI per leaf, then CMO

    def age_gfn_range(self, slot: Memslot, start: int, end: int, mkold: bool) -> bool:
        if self.pgt is None:
            return False
        return self.pgt.test_clear_young(start << 12, end << 12, mkold)

    def release(self) -> None:
        """exit_mmap: detach the tables under the lock, free them outside it."""
        with self.services.mmu_write_lock():
            pgt, self.pgt = self.pgt, None
        if pgt is not None:
            pgt.destroy()

    def destroy(self) -> None:
        self.release()

    # ------------------------------------------------- memslots and dirty log
    def commit_memory_region(self, old, new, change: MemslotChange) -> None:
        svc = self.services
        with svc.mmu_write_lock():
            if change in (MemslotChange.DELETE, MemslotChange.MOVE):
                self.pgt.unmap(old.base_gfn << 12, old.end_gfn << 12)
            if new is not None and new.is_logging and not (old and old.is_logging):
                # Logging turned on: write-protect the slot, then flush it.
                self.pgt.wrprotect(new.base_gfn << 12, new.end_gfn << 12)
                svc.tlb_flush_vmid_range(new.base_gfn << 12, new.npages * PAGE_SIZE)

    def get_dirty_log(self, slot: Memslot) -> frozenset[int]:
        svc = self.services
        dirty = svc.take_dirty_bitmap(slot)  # snapshot and clear
        if dirty:
            with svc.mmu_write_lock():
                for gfn in dirty:  # re-protect what is reported
                    self.pgt.wrprotect(gfn << 12, (gfn + 1) << 12)
                svc.tlb_flush_vmid_range(slot.base_gfn << 12, slot.npages * PAGE_SIZE)
        return dirty

    # ---------------------------------------- caches: TVM and set/way
    def vcpu_init(self, vcpu: int) -> None:
        if not self.config.fwb:  # with FWB, HCR_EL2.FWB instead of TVM
            self.tvm[vcpu] = True
            self.services.set_tvm(vcpu, True)

    def handle_sysreg_write(self, vcpu, reg, old: int, new: int) -> None:
        """kvm_toggle_cache (rules §6.3)."""
        was_on, now_on = old & CACHES_ON == CACHES_ON, new & CACHES_ON == CACHES_ON
        if was_on != now_on:
            self.flush_vm()
        if now_on:  # stop trapping until the next set/way op
            self.tvm[vcpu] = False
            self.services.set_tvm(vcpu, False)

    def handle_set_way(self, vcpu: int) -> None:
        """kvm_set_way_flush (rules §6.4): flush on the first op, re-arm TVM."""
        if self.config.fwb or self.tvm.get(vcpu):
            return
        self.flush_vm()
        self.tvm[vcpu] = True
        self.services.set_tvm(vcpu, True)

    def flush_vm(self) -> None:
        """stage2_flush_vm: clean+invalidate every mapped page to PoC."""
        with self.services.mmu_write_lock():
            for slot in self.services.memslots():
                self.pgt.flush(slot.base_gfn << 12, slot.end_gfn << 12)
