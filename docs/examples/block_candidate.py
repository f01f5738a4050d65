"""A correct stage-2 candidate that maps 2 MiB blocks (docs/candidate-protocol.md).

It starts from docs/examples/minimal_candidate.py and adds what blocks need:

- a 2 MiB block where rules §3.3 and §3.4 allow one: the memslot is not logging,
  gfn and hva are congruent modulo 2 MiB (§3.3 (a)), the 2 MiB window lies inside
  the memslot (§3.3 (b)), and the host maps the hva with a THP right now
  (``host_mapping_size``, read under ``mmu_lock`` after the retry check, §3.4);
  4 KiB pages everywhere else;
- permission faults on a block outside dirty logging relax the whole block in place
  (§3.2 step 15 keeps ``fault_granule``; §3.2.1), with the local TLBI of §7.5;
- a write (or exec) permission fault on a block while the slot logs splits it:
  the block is broken and only the faulting 4 KiB page is mapped (§4.3, §3.2.1),
  and, without FWB, the whole old block is cleaned after the TLBI so that none of
  its pages vanishes from stage 2 uncleaned (the gap of §6.6, which the suite
  treats as a finding against KVM);
- after logging is turned off, a fault in a THP window that still holds 4 KiB
  pages collapses the L2 table back into a block (§4.6, §3.2.1): break the table
  entry with a TLBI over the whole 2 MiB span (§2.4, §8 bug 9) and free the
  subtree (§2.5 "Freeing table pages").

Everything runs under the write lock (one exclusive walker, no RCU needed: a table
only exclusive walkers could see may be freed at once, §9.7 L2). Notifiers, aging,
memslot changes, the dirty log and the cache toggles are the minimal candidate's,
relying on ``PageTable`` treating a block as one leaf (§2.2 step 7).
"""

from __future__ import annotations

from candidates.common import KvmBase, PageTable
from conformance.protocol import (
    PAGE_SIZE, SCTLR_C, SCTLR_M, Capabilities, Exit, FaultKind, GuestAbort,
    Memslot, MemslotChange)
from model import descriptors as d
from model.geometry import granule

CACHES_ON = SCTLR_M | SCTLR_C
BLOCK_LEVEL = 2
BLOCK_SIZE = granule(BLOCK_LEVEL)  # 2 MiB
BLOCK_PAGES = BLOCK_SIZE // PAGE_SIZE  # 512
PTES_PER_TABLE = 512


class BlockCandidate(KvmBase):
    capabilities = Capabilities(concurrent=False, fwb=True, hw_af=True, dic=True,
                                max_vcpus=4, block_mappings=True)
    version = "1"

    def __init__(self, services, config):
        super().__init__(services, config)  # mmu_invalidate_seq / _in_progress
        self.pgt: PageTable | None = PageTable(services)  # allocates the PGD
        self.tvm: dict[int, bool] = {}

    # ----------------------------------------------------------- the fault path
    def handle_guest_abort(self, vcpu: int, fault: GuestAbort) -> Exit:
        svc = self.services
        write = fault.is_write_fault
        # No memslot, or a write to a read-only memslot: MMIO (rules §3.1 step 7).
        slot = self.gfn_to_memslot(fault.gfn)
        if slot is None or (write and slot.readonly):
            return Exit.MMIO
        if fault.kind is FaultKind.ACCESS_FLAG:
            return self.handle_access_fault(fault)

        # Snapshot the notifier sequence before GUP: GUP may sleep and may raise
        # notifiers itself (KSM copy-on-write), rules §3.2 steps 9-10, §9.5 N2.
        hva = slot.gfn_to_hva(fault.gfn)
        mmu_seq = self.mmu_invalidate_seq
        page = svc.gup(hva, write)
        if page is None:
            return Exit.EFAULT  # no VMA, or a write to a read-only VMA
        writable = page.writable and not slot.readonly
        if slot.is_logging and not write:
            writable = False  # read faults map read-only while logging (§4.3)

        with svc.mmu_write_lock():
            if not self.mmu_invalidate_retry(mmu_seq):  # §3.2 step 14
                self.user_mem_abort(slot, hva, fault, page.pfn, writable)
        # The stage-2 mapping keeps no page reference: release exactly the pfn
        # GUP returned, not the THP head a block maps (rules §3.2 step 20, §3.4).
        svc.release_page(page.pfn)
        return Exit.RESUME

    def user_mem_abort(self, slot: Memslot, hva: int, fault: GuestAbort,
                       pfn: int, writable: bool) -> None:
        """The part of user_mem_abort under mmu_lock (rules §3.2 steps 15-19)."""
        prot = d.Prot.R
        if writable:
            prot |= d.Prot.W
        # X only for an instruction abort, or for all Normal memory with DIC
        # (rules §3.2 step 17, §6.2: lazy execute permission).
        if fault.is_exec_fault or self.config.dic:
            prot |= d.Prot.X

        _, leaf, leaf_level = self.pgt.lookup(fault.ipa)
        if slot.is_logging:
            # Every fault in a logging slot forces 4 KiB (rules §4.3, §9.4 D5).
            size = PAGE_SIZE
        elif (fault.kind is FaultKind.PERMISSION and d.is_valid(leaf)
              and leaf_level == BLOCK_LEVEL
              and d.pte_pa(leaf) == (pfn & ~(BLOCK_PAGES - 1)) << 12):
            # A permission fault on a block keeps fault_granule: relax the whole
            # block, no THP adjustment (rules §3.2 step 15, §3.2.1). The block is
            # only still there because no notifier removed its THP (§9.5 N1),
            # which the pfn check above confirms.
            size = BLOCK_SIZE
        elif (self.block_allowed(slot, hva)
              and self.services.host_mapping_size(hva) >= BLOCK_SIZE):
            # transparent_hugepage_adjust (rules §3.4): the answer is trusted only
            # because we hold mmu_lock after a successful retry check.
            size = BLOCK_SIZE
        else:
            size = PAGE_SIZE

        if size == BLOCK_SIZE:
            # Round the IPA down to the block and the pfn down to the THP head
            # (which is 2 MiB aligned); congruence makes the offsets agree (§3.4).
            new = self.map_block(fault.ipa & ~(BLOCK_SIZE - 1),
                                 (pfn & ~(BLOCK_PAGES - 1)) << 12, prot)
        else:
            new = self.map_page(fault.ipa, pfn << 12, prot)
        if slot.is_logging and new & d.S2AP_W:
            # Mark before the vCPU resumes, under mmu_lock as <=v6.12 does (§9.4 D2).
            # Only 4 KiB pages get here: a logging slot never has a writable block.
            self.services.mark_page_dirty(slot, fault.gfn)

    @staticmethod
    def block_allowed(slot: Memslot, hva: int) -> bool:
        """fault_supports_stage2_huge_mapping for 2 MiB (rules §3.3)."""
        gpa_start = slot.base_gfn << 12
        # (a) congruence: the IPA window and the hva window hold the same pages.
        if gpa_start % BLOCK_SIZE != slot.userspace_addr % BLOCK_SIZE:
            return False
        # (b) containment: a leaf maps its whole granule, so the 2 MiB window
        # around hva must lie inside the memslot's userspace range.
        window = hva & ~(BLOCK_SIZE - 1)
        return window >= slot.userspace_addr and window + BLOCK_SIZE <= slot.hva_end

    # -------------------------------------------------- installing one leaf
    def map_block(self, ipa: int, pa: int, prot: d.Prot) -> int:
        """Install a 2 MiB block at ``ipa`` (aligned) mapping ``pa``; returns it."""
        ptep, old, level = self.pgt.lookup(ipa, alloc_to=BLOCK_LEVEL)
        if level > BLOCK_LEVEL:
            # lookup descended through an existing L2 table: 4 KiB pages left
            # from dirty logging (or from before the THP). Collapse (§4.6).
            ptep = self.collapse_table(ipa, pa)
            old = 0
        elif level < BLOCK_LEVEL:
            raise AssertionError(f"unexpected L{level} leaf at IPA {ipa:#x}")  # never created
        return self.set_leaf(ptep, old, pa, BLOCK_LEVEL, prot, ipa)

    def map_page(self, ipa: int, pa: int, prot: d.Prot) -> int:
        """Install a 4 KiB page at ``ipa``; returns it."""
        ptep, old, level = self.pgt.lookup(ipa, alloc_to=3)
        if level == BLOCK_LEVEL and d.is_valid(old):
            # A 4 KiB fault inside a block: dirty logging started since the
            # block was made (write or exec permission fault, rules §4.3,
            # §3.2.1). Break the block, then map this page only; its siblings
            # fault back in later, read-only while logging.
            self.split_block(ptep, old, ipa & ~(BLOCK_SIZE - 1))
            ptep, old, level = self.pgt.lookup(ipa, alloc_to=3)
        assert level == 3, f"no L3 entry for IPA {ipa:#x}"
        return self.set_leaf(ptep, old, pa, 3, prot, ipa)

    def set_leaf(self, ptep: int, old: int, pa: int, level: int,
                 prot: d.Prot, ipa: int) -> int:
        """``stage2_map_walker_try_leaf`` for one entry (rules §2.5 steps 3-7)."""
        svc = self.services
        size = granule(level)
        ipa &= ~(size - 1)
        if d.is_valid(old) and not d.is_table(old, level) and d.pte_pa(old) == pa:
            # Same output and size: only permissions can differ. Never lower
            # them (a vCPU may have raced us to relax, §3.2.1), relax in place:
            # an attribute-only change needs no break (§1.5 rule 2).
            old_prot = d.pte_prot(old, self.config.fwb)
            new = d.make_leaf(pa, level, prot | old_prot, self.config.fwb)
            if new != old:
                if not new & d.XN and old & d.XN and not self.config.dic:
                    svc.icache_inval_pou(pa, size)  # before X is set (§2.5 relax_perms)
                svc.write_pte(ptep, new)
            # The faulting CPU may still cache the weaker entry (§1.5 rule 1):
            # a local TLBI at the leaf's level, even if nothing changed because
            # another vCPU relaxed first (§7.5, §8 bug 14).
            svc.tlb_flush_vmid_ipa_nsh(ipa, level)
            return new

        new = d.make_leaf(pa, level, prot, self.config.fwb)
        if d.is_valid(old):
            # Another output, size or type: break-before-make (§2.4). Cannot
            # happen while notifiers work (§3.2.1 last row), handled anyway.
            self.break_leaf(ptep, old, level, ipa)
        # Clean the whole new granule (4 KiB or 2 MiB) while the entry is
        # invalid, G-C1; nothing to do with FWB (rules §6.2).
        if not self.config.fwb:
            svc.dcache_clean_inval_poc(pa, size)
        if not new & d.XN and not self.config.dic:
            svc.icache_inval_pou(pa, size)  # G-C2, whole granule
        svc.write_pte(ptep, new)  # make
        svc.get_page(ptep)  # 0 -> non-zero counts on the table (rules §2.3)
        return new

    def break_leaf(self, ptep: int, old: int, level: int, ipa: int) -> None:
        """Unmap one valid leaf: invalid, TLBI by IPA at its level, put_page, then
        clean its whole granule after the TLBI (rules §2.4, §6.2, §9.6 C3)."""
        svc = self.services
        svc.write_pte(ptep, 0)
        svc.tlb_flush_vmid_ipa(ipa, level)  # the real level: a wrong hint removes nothing
        svc.put_page(ptep)
        if not self.config.fwb and d.is_cacheable(old, self.config.fwb):
            svc.dcache_clean_inval_poc(d.pte_pa(old), granule(level))

    def split_block(self, ptep: int, block: int, block_ipa: int) -> None:
        """Map-time split of a block (rules §2.5 "LEAF with -E2BIG", §4.3).

        KVM only breaks the block and lets the other 511 pages disappear without
        any cache maintenance; rules §6.6 describes why that loses data written
        with caches off and the suite checks for it (G-C4 for every page the guest
        could reach). So without FWB the whole old block is cleaned after the
        TLBI, which ``break_leaf`` does for any leaf: the first of the two fixes
        §6.6 proposes. That is why the class declares no ``known_findings``
        (docs/findings.md, ``block-split-no-cmo``)."""
        self.break_leaf(ptep, block, BLOCK_LEVEL, block_ipa)

    def collapse_table(self, block_ipa: int, block_pa: int) -> int:
        """Replace the L2 table under ``block_ipa`` by an empty L2 entry and free
        the table; returns the L2 ptep, ready for the block (rules §2.4, §2.5)."""
        svc = self.services
        end = block_ipa + BLOCK_SIZE
        l2 = [(ptep, pte) for ptep, pte, level, _ in self.pgt.entries(block_ipa, end)
              if level == BLOCK_LEVEL and d.is_table(pte, BLOCK_LEVEL)]
        assert len(l2) == 1, f"no L2 table entry for IPA {block_ipa:#x}"
        l2_ptep, table_entry = l2[0]
        table = d.pte_pa(table_entry)
        leaves = [(pte, ipa) for _, pte, level, ipa in self.pgt.leaves(block_ipa, end)
                  if level == 3]

        # Break the table entry. One TLBI by IPA is not enough: every leaf and
        # walk-cache entry under the table must go, so invalidate the whole
        # 2 MiB span (rules §2.4, §9.3 T3, §8 bug 9).
        svc.write_pte(l2_ptep, 0)
        svc.tlb_flush_vmid_range(block_ipa, BLOCK_SIZE)
        svc.put_page(l2_ptep)
        # The old pages are now unmapped: clean them after the TLBI (G-C4,
        # §9.6 C3). Pages inside the new block are cleaned when it is made.
        if not self.config.fwb:
            for pte, _ in leaves:
                pa = d.pte_pa(pte)
                if not block_pa <= pa < block_pa + BLOCK_SIZE and d.is_cacheable(pte, self.config.fwb):
                    svc.dcache_clean_inval_poc(pa, PAGE_SIZE)
        # Free the detached table: put every non-zero entry, then the initial
        # reference, so the page reaches 0 on its last put (§2.5 "Freeing table
        # pages", §8 bug 18). No RCU delay: only exclusive walkers exist here.
        for i in range(PTES_PER_TABLE):
            if svc.read_pte(table + 8 * i) != 0:
                svc.put_page(table + 8 * i)
        svc.put_page(table)
        return l2_ptep

    def handle_access_fault(self, fault: GuestAbort) -> Exit:
        """``kvm_pgtable_stage2_mkyoung`` (rules §3.6): set AF in place on the
        leaf, page or block; an AF=0 entry is never in a TLB, so no TLBI."""
        with self.services.mmu_write_lock():
            ptep, pte, level = self.pgt.lookup(fault.ipa)
            if d.is_valid(pte) and not pte & d.AF:
                self.services.write_pte(ptep, pte | d.AF)
        return Exit.RESUME  # if it was unmapped meanwhile, the guest refaults

    # ------------------------------------------------------- MMU notifiers
    # KvmBase.invalidate_range_start/_end keep the sequence and call this for
    # every memslot part backed by the range; PageTable.unmap removes a block
    # partly in the range whole (rules §2.2 step 7, §9.2 G7) and cleans its
    # whole granule after the TLBI (G-C4).
    def unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> None:
        if self.pgt is not None:  # nothing left after release() (§9.5 N3)
            self.pgt.unmap(start << 12, end << 12)

    def age_gfn_range(self, slot: Memslot, start: int, end: int, mkold: bool) -> bool:
        # A block overlapping the range counts as one leaf backed by it (§5.2).
        if self.pgt is None:
            return False
        return self.pgt.test_clear_young(start << 12, end << 12, mkold)

    def release(self) -> None:
        """exit_mmap: detach the tables under the lock, free them outside it (§5.2)."""
        with self.services.mmu_write_lock():
            pgt, self.pgt = self.pgt, None
        if pgt is not None:
            pgt.destroy()

    def destroy(self) -> None:
        self.release()

    # ------------------------------------------------- memslots and dirty log
    def commit_memory_region(self, old, new, change: MemslotChange) -> None:
        svc = self.services
        if self.pgt is None:
            return
        with svc.mmu_write_lock():
            if change in (MemslotChange.DELETE, MemslotChange.MOVE):
                # Nothing may map the old gfn range (§7.2, §9.2 G1). Blocks never
                # cross a memslot edge (§3.3 (b)), so this removes no neighbour.
                self.pgt.unmap(old.base_gfn << 12, old.end_gfn << 12)
            if new is not None and new.is_logging and not (old and old.is_logging):
                # Logging on (§4.2): write-protect every leaf, blocks included,
                # then flush the slot. Blocks stay (read-only) until a write
                # fault splits them (§4.3, §9.4 D5): no eager split.
                self.pgt.wrprotect(new.base_gfn << 12, new.end_gfn << 12)
                svc.tlb_flush_vmid_range(new.base_gfn << 12, new.npages * PAGE_SIZE)
            # Logging off: nothing (§4.6); blocks come back by collapse on the
            # next fault in a THP window.

    def get_dirty_log(self, slot: Memslot) -> frozenset[int]:
        """KVM_GET_DIRTY_LOG (rules §4.4): snapshot, re-protect, flush, report."""
        svc = self.services
        dirty = svc.take_dirty_bitmap(slot)
        if dirty:
            with svc.mmu_write_lock():
                for gfn in dirty:
                    # Only 4 KiB pages can be writable in a logging slot.
                    self.pgt.wrprotect(gfn << 12, (gfn + 1) << 12)
                svc.tlb_flush_vmid_range(slot.base_gfn << 12, slot.npages * PAGE_SIZE)
        return dirty

    # ---------------------------------------- caches: TVM and set/way
    def vcpu_init(self, vcpu: int) -> None:
        if not self.config.fwb:  # with FWB, HCR_EL2.FWB instead of TVM (§6.3)
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
        """stage2_flush_vm: clean+invalidate every mapped leaf to PoC; for a
        block, ``PageTable.flush`` cleans its whole 2 MiB (rules §6.3)."""
        with self.services.mmu_write_lock():
            for slot in self.services.memslots():
                self.pgt.flush(slot.base_gfn << 12, slot.end_gfn << 12)
