"""The reference candidate: the simplest correct stage-2 manager.

4 KiB pages only; every install is a full break-before-make with a broadcast
TLBI, even when only permissions change; clean+invalidate to PoC on every map
and after every unmap; every page executable with the I-cache invalidated at
map time; TVM armed for the VM's whole life and a full flush on every
SCTLR_EL1.{M,C} toggle and every set/way op; dirty bits marked under the lock
for every writable install. Everything runs under the mmu_lock write lock.

It is deliberately slow (see the cost counters) and deliberately obvious: it is
the candidate the suite must always pass.
"""

from __future__ import annotations

from candidates.common import KvmBase, PageTable
from conformance.protocol import (
    SCTLR_C, SCTLR_M, Capabilities, Exit, GuestAbort, Memslot, MemslotChange)
from model import descriptors as d


class ReferenceCandidate(KvmBase):
    capabilities = Capabilities(concurrent=True, fwb=True, hw_af=True, dic=True,
                                max_vcpus=4, block_mappings=False)
    version = "1.0"

    def __init__(self, services, config):
        super().__init__(services, config)
        self.pgt: PageTable | None = PageTable(services)

    # ------------------------------------------------------------ vCPUs
    def vcpu_init(self, vcpu: int) -> None:
        if not self.config.fwb:
            self.services.set_tvm(vcpu, True)

    def handle_sysreg_write(self, vcpu, reg, old, new) -> None:
        bits = SCTLR_M | SCTLR_C
        if (old & bits == bits) != (new & bits == bits):
            self.flush_vm()

    def handle_set_way(self, vcpu: int) -> None:
        if not self.config.fwb:
            self.flush_vm()

    def flush_vm(self) -> None:
        with self.services.mmu_write_lock():
            for slot in self.services.memslots() if self.pgt is not None else ():
                self.pgt.flush(slot.base_gfn << 12, slot.end_gfn << 12)

    # --------------------------------------------------------- the fault path
    def handle_guest_abort(self, vcpu: int, fault: GuestAbort) -> Exit:
        slot = self.gfn_to_memslot(fault.gfn)
        write = fault.is_write_fault
        if slot is None or (write and slot.readonly):
            return Exit.MMIO
        seq = self.mmu_invalidate_seq
        page = self.services.gup(slot.gfn_to_hva(fault.gfn), write)
        if page is None:
            return Exit.EFAULT
        writable = page.writable and not slot.readonly and (write or not slot.is_logging)
        prot = d.Prot.R | d.Prot.X | (d.Prot.W if writable else d.Prot(0))
        exit_ = Exit.RESUME
        with self.services.mmu_write_lock():
            if self.pgt is None:
                exit_ = Exit.EFAULT  # release won the race: the mm is gone (rules §5.2)
            elif not self.mmu_invalidate_retry(seq):
                new = d.make_leaf(page.pfn << 12, 3, prot, self.config.fwb)
                ptep, old, level = self.pgt.lookup(fault.ipa, alloc_to=3)
                # A stale fault (another vCPU mapped the page meanwhile) never
                # takes permissions away (rules §2.5 map step 3, §9.3 T7).
                if not _grants_as_much(old, new):
                    self.pgt.install(ptep, old, new, fault.ipa, 3)
                if writable and slot.is_logging:
                    self.services.mark_page_dirty(slot, fault.gfn)
        self.services.release_page(page.pfn)
        return exit_

    # ------------------------------------------------------------ notifiers
    def unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> None:
        if self.pgt is not None:
            self.pgt.unmap(start << 12, end << 12)

    def age_gfn_range(self, slot: Memslot, start: int, end: int, mkold: bool) -> bool:
        if self.pgt is None:
            return False
        return self.pgt.test_clear_young(start << 12, end << 12, mkold)

    def release(self) -> None:
        with self.services.mmu_write_lock():
            pgt, self.pgt = self.pgt, None
        if pgt is not None:
            pgt.destroy()

    def destroy(self) -> None:
        self.release()

    # ------------------------------------------------------ memslots, logging
    def commit_memory_region(self, old, new, change) -> None:
        with self.services.mmu_write_lock():
            if change in (MemslotChange.DELETE, MemslotChange.MOVE):
                self.pgt.unmap(old.base_gfn << 12, old.end_gfn << 12)
            if new is not None and new.is_logging and not (old and old.is_logging):
                self.pgt.wrprotect(new.base_gfn << 12, new.end_gfn << 12)
                self.services.tlb_flush_vmid()

    def get_dirty_log(self, slot: Memslot) -> frozenset[int]:
        dirty = self.services.take_dirty_bitmap(slot)
        if dirty:
            with self.services.mmu_write_lock():
                if self.pgt is None:  # released: nothing left to protect
                    return dirty
                for gfn in dirty:
                    self.pgt.wrprotect(gfn << 12, (gfn + 1) << 12)
                self.services.tlb_flush_vmid()
        return dirty


def _grants_as_much(old: int, new: int) -> bool:
    """Is ``old`` the leaf ``new`` would be, with the same permissions or more?"""
    return d.is_valid(old) and not (old ^ new) & ~d.S2_PERMS \
        and not new & ~old & (d.S2AP_R | d.S2AP_W) and not old & ~new & d.XN
