"""What generic KVM code (``virt/kvm/kvm_main.c``) does for every arch, plus a
plain exclusive page-table walker, so that each candidate stays short.

* :class:`KvmBase` — memslot lookup and the MMU-notifier sequence/in-progress
  bookkeeping (rules §5.1), dirty-bitmap plumbing.
* :class:`PageTable` — table allocation, lookup, break-before-make install,
  unmap with pruning of empty tables, write-protect, aging, flush, teardown,
  all through :class:`conformance.platform.services.Services` and with the refcount
  discipline of rules §2.3: ``refcount(T) = 1 + non-zero entries``.
"""

from __future__ import annotations

from conformance.protocol import Candidate, Memslot, NotifierRange
from model import descriptors as d
from model.geometry import granule, index


class PageTable:
    def __init__(self, svc):
        self.svc = svc
        self.geom = svc.geometry
        self.fwb = svc.config.fwb
        self.pgd = svc.alloc_pgd()

    # --------------------------------------------------------------- walking
    def _root(self, ipa: int) -> tuple[int, int]:
        page, _ = self.geom.pgd_slot(ipa)
        return self.pgd + (page << 12), self.geom.start_level

    def lookup(self, ipa: int, alloc_to: int | None = None) -> tuple[int, int, int]:
        """Descend towards ``ipa``; returns ``(ptep, pte, level)`` of the entry
        that maps it (a leaf or an invalid entry). With ``alloc_to``, missing
        tables are allocated down to that level."""
        table, level = self._root(ipa)
        while True:
            ptep = table + index(ipa, level) * 8
            pte = self.svc.read_pte(ptep)
            if d.is_table(pte, level):
                table, level = d.pte_pa(pte), level + 1
                continue
            if alloc_to is None or level >= alloc_to or d.is_valid(pte):
                return ptep, pte, level
            child = self.svc.zalloc_page()
            self.svc.write_pte(ptep, d.Table(child).encode())
            self.svc.get_page(ptep)
            table, level = child, level + 1

    def entries(self, start: int, end: int, table: int | None = None,
                level: int | None = None, base: int = 0):
        """Post-order ``(ptep, pte, level, ipa)`` for every valid entry
        overlapping ``[start, end)``: children before their table entry."""
        if table is None:
            span = granule(self.geom.start_level) * 512
            for page in range(self.geom.pgd_pages):
                lo = page * span
                if lo < end and start < lo + span:
                    yield from self.entries(start, end, self.pgd + (page << 12),
                                            self.geom.start_level, lo)
            return
        size = granule(level)
        for idx in range(max(0, (start - base) // size), min(511, (end - 1 - base) // size) + 1):
            ptep = table + idx * 8
            pte = self.svc.read_pte(ptep)
            if not d.is_valid(pte):
                continue
            ipa = base + idx * size
            if d.is_table(pte, level):
                yield from self.entries(start, end, d.pte_pa(pte), level + 1, ipa)
                pte = self.svc.read_pte(ptep)
                if not d.is_valid(pte):
                    continue
            yield ptep, pte, level, ipa

    def leaves(self, start: int, end: int):
        for ptep, pte, level, ipa in self.entries(start, end):
            if not d.is_table(pte, level):
                yield ptep, pte, level, ipa

    # ------------------------------------------------------------- changing
    def clean(self, pte: int, level: int) -> None:
        """``__clean_dcache_guest_page``: nothing to do with FWB (rules §2.3)."""
        if not self.fwb and d.is_cacheable(pte, self.fwb):
            self.svc.dcache_clean_inval_poc(d.pte_pa(pte), granule(level))

    def install(self, ptep: int, old: int, new: int, ipa: int, level: int) -> None:
        """Break-before-make (rules §2.4): invalid, TLBI, then the new leaf,
        with the CMOs done while the entry is invalid."""
        if d.is_valid(old):
            self.svc.write_pte(ptep, 0)
            self.svc.tlb_flush_vmid_ipa(ipa, level)
            self.clean(old, level)
            self.svc.put_page(ptep)
        self.clean(new, level)
        if d.decode(new, level).exec:
            self.svc.icache_inval_pou(d.pte_pa(new), granule(level))
        self.svc.write_pte(ptep, new)
        self.svc.get_page(ptep)

    def unmap(self, start: int, end: int) -> int:
        """``kvm_pgtable_stage2_unmap``: clear leaves (whole blocks), TLBI each,
        clean+invalidate after the TLBI, free tables that became empty.
        Returns the number of leaves removed."""
        removed = 0
        for ptep, pte, level, ipa in list(self.entries(start, end)):
            if d.is_table(pte, level):
                child = d.pte_pa(pte)
                if self.svc.page_count(child) == 1:
                    self.svc.write_pte(ptep, 0)
                    self.svc.tlb_flush_vmid_ipa(ipa, None)
                    self.svc.put_page(ptep)
                    self.svc.put_page(child)
                continue
            self.svc.write_pte(ptep, 0)
            self.svc.tlb_flush_vmid_ipa(ipa, level)
            self.clean(pte, level)
            self.svc.put_page(ptep)
            removed += 1
        return removed

    def wrprotect(self, start: int, end: int) -> bool:
        """``kvm_pgtable_stage2_wrprotect``: clear S2AP_W, no TLBI (caller flushes)."""
        changed = False
        for ptep, pte, level, ipa in self.leaves(start, end):
            if pte & d.S2AP_W:
                self.svc.write_pte(ptep, pte & ~d.S2AP_W)
                changed = True
        return changed

    def test_clear_young(self, start: int, end: int, mkold: bool) -> bool:
        young = False
        for ptep, pte, level, ipa in self.leaves(start, end):
            if pte & d.AF:
                young = True
                if mkold:
                    self.svc.write_pte(ptep, pte & ~d.AF)
        return young

    def flush(self, start: int, end: int) -> None:
        """``kvm_pgtable_stage2_flush``: clean+invalidate every cacheable leaf."""
        if self.fwb:
            return
        for ptep, pte, level, ipa in self.leaves(start, end):
            self.clean(pte, level)

    def destroy(self) -> None:
        """``kvm_pgtable_stage2_destroy``: drop every entry and table, then the PGD."""
        for ptep, pte, level, ipa in list(self.entries(0, self.geom.ipa_limit)):
            self.svc.write_pte(ptep, 0)
            self.svc.put_page(ptep)
            if d.is_table(pte, level):
                self.svc.put_page(d.pte_pa(pte))
        self.svc.free_pgd(self.pgd)


class KvmBase(Candidate):
    """Generic KVM: memslots and MMU-notifier bookkeeping (rules §5.1).

    Subclasses implement ``unmap_gfn_range(slot, start_gfn, end_gfn)``; the
    notifier sequence (``mmu_invalidate_seq``, ``mmu_invalidate_in_progress``)
    is kept here, and :meth:`mmu_invalidate_retry` is the fault path's check.
    """

    def __init__(self, services, config):
        super().__init__(services, config)
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        for slot in self.services.memslots():
            if slot.contains_gfn(gfn):
                return slot
        return None

    def slots_for_range(self, rng: NotifierRange):
        """Every (slot, start_gfn, end_gfn) backed by hvas in ``rng``."""
        for slot in self.services.memslots():
            lo, hi = max(rng.start, slot.userspace_addr), min(rng.end, slot.hva_end)
            if lo < hi:
                yield slot, slot.hva_to_gfn(lo), slot.hva_to_gfn(hi - 1) + 1

    def mmu_invalidate_retry(self, seq: int) -> bool:
        return self.mmu_invalidate_in_progress != 0 or self.mmu_invalidate_seq != seq

    def invalidate_range_start(self, rng: NotifierRange) -> None:
        hits = list(self.slots_for_range(rng))
        if not hits:
            return
        with self.services.mmu_write_lock():
            self.mmu_invalidate_in_progress += 1
            for slot, start, end in hits:
                self.unmap_gfn_range(slot, start, end)

    def invalidate_range_end(self, rng: NotifierRange) -> None:
        if not any(self.slots_for_range(rng)):
            return
        with self.services.mmu_write_lock():
            self.mmu_invalidate_seq += 1
            self.mmu_invalidate_in_progress -= 1

    def unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> None:
        raise NotImplementedError

    def age_gfn_range(self, slot: Memslot, start: int, end: int, mkold: bool) -> bool:
        raise NotImplementedError

    def _age(self, rng: NotifierRange, mkold: bool) -> bool:
        young = False
        with self.services.mmu_write_lock():
            for slot, start, end in self.slots_for_range(rng):
                young |= self.age_gfn_range(slot, start, end, mkold)
        return young

    def clear_flush_young(self, rng: NotifierRange) -> bool:
        young = self._age(rng, mkold=True)
        if young:
            self.services.tlb_flush_vmid()  # kvm_flush_remote_tlbs on return
        return young

    def clear_young(self, rng: NotifierRange) -> bool:
        return self._age(rng, mkold=True)

    def test_young(self, rng: NotifierRange) -> bool:
        return self._age(rng, mkold=False)
