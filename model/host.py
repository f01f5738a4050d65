"""The host: the VMM's address space as Linux mm would keep it (rules §3.4, §5).

``HostMm`` maps VMM virtual addresses (hva) to physical pages. It knows VMAs
(writable or not, THP-eligible or not), per-page host PTEs (pfn, writable,
part of a 2 MiB THP, KSM-shared) and the GUP references KVM holds.

It does *not* call MMU notifiers: the platform brackets every mutation below
with ``invalidate_range_start``/``end`` (the event types are in
:class:`conformance.protocol.NotifierEvent`). Mutations that copy a page
(migration, THP collapse, KSM copy-on-write) copy through the cacheable alias,
as the kernel does (DESIGN §3).
"""

from __future__ import annotations

import attrs

from model import cache
from model.memory import PhysicalMemory

PAGE = 1 << 12
THP_SIZE = 2 << 20
THP_PAGES = THP_SIZE // PAGE


def page_down(hva: int) -> int:
    return hva & ~(PAGE - 1)


def thp_down(hva: int) -> int:
    return hva & ~(THP_SIZE - 1)


@attrs.frozen
class Vma:
    start: int
    end: int
    writable: bool = True
    thp: bool = False

    def contains(self, hva: int) -> bool:
        return self.start <= hva < self.end


@attrs.frozen
class HostPte:
    pfn: int
    writable: bool
    huge: bool = False  # mapped by a 2 MiB PMD (THP)
    ksm: bool = False  # a KSM page shared copy-on-write


@attrs.frozen
class HostPage:
    """What GUP returns (``__gfn_to_pfn_memslot`` / ``__kvm_faultin_pfn``)."""

    pfn: int
    writable: bool


@attrs.define
class HostMm:
    mem: PhysicalMemory
    vmas: list[Vma] = attrs.Factory(list)
    ptes: dict[int, HostPte] = attrs.Factory(dict)
    mapcount: dict[int, int] = attrs.Factory(dict)  # pfn -> host PTEs mapping it
    gup_refs: dict[int, int] = attrs.Factory(dict)
    zombies: set[int] = attrs.Factory(set)  # unmapped but still referenced

    # -- queries ---------------------------------------------------------
    def vma_at(self, hva: int) -> Vma | None:
        for vma in self.vmas:
            if vma.contains(hva):
                return vma
        return None

    def pte(self, hva: int) -> HostPte | None:
        return self.ptes.get(page_down(hva))

    def mapping_size(self, hva: int) -> int:
        """``get_user_mapping_size``: 2 MiB for a THP-mapped hva, else 4 KiB."""
        pte = self.pte(hva)
        return THP_SIZE if pte is not None and pte.huge else PAGE

    def thp_possible(self, hva: int) -> bool:
        vma = self.vma_at(hva)
        base = thp_down(hva)
        return (vma is not None and vma.thp and vma.start <= base
                and base + THP_SIZE <= vma.end)

    # -- host page faults and GUP ----------------------------------------
    def fault_in(self, hva: int, write: bool) -> HostPte | None:
        """A host page fault at ``hva``; ``None`` for SIGSEGV (no VMA, or a
        write to a read-only VMA)."""
        vma = self.vma_at(hva)
        if vma is None or (write and not vma.writable):
            return None
        pte = self.pte(hva)
        if pte is None:
            if self.thp_possible(hva) and not any(
                    self.pte(thp_down(hva) + i * PAGE) for i in range(THP_PAGES)):
                base = self.mem.alloc_data(THP_PAGES, align=THP_PAGES)
                for i in range(THP_PAGES):
                    self._set(thp_down(hva) + i * PAGE, HostPte(
                        base + i, vma.writable, huge=True))
            else:
                self._set(page_down(hva), HostPte(self.mem.alloc_data(), vma.writable))
            pte = self.pte(hva)
        return pte

    def needs_cow(self, hva: int, write: bool) -> bool:
        pte = self.pte(hva)
        return write and pte is not None and pte.ksm

    def get_page(self, pfn: int) -> None:
        self.gup_refs[pfn] = self.gup_refs.get(pfn, 0) + 1

    def put_page(self, pfn: int) -> None:
        refs = self.gup_refs.get(pfn, 0)
        if refs <= 0:
            raise ValueError(f"put of host page PA {pfn << 12:#x} with no reference")
        if refs == 1:
            del self.gup_refs[pfn]
            if pfn in self.zombies:
                self.zombies.discard(pfn)
                self.mem.free(pfn)
        else:
            self.gup_refs[pfn] = refs - 1

    # -- mutations (each bracketed by notifiers by the platform) -----------
    def _set(self, hva: int, pte: HostPte) -> None:
        self.mapcount[pte.pfn] = self.mapcount.get(pte.pfn, 0) + 1
        old = self.ptes.get(hva)
        self.ptes[hva] = pte
        if old is not None:
            self._unmap_page(old.pfn)

    def _drop(self, hva: int) -> None:
        pte = self.ptes.pop(page_down(hva), None)
        if pte is not None:
            self._unmap_page(pte.pfn)

    def _unmap_page(self, pfn: int) -> None:
        """One host PTE fewer maps ``pfn``; the last one frees it (or leaves it
        to the last GUP reference)."""
        self.mapcount[pfn] -= 1
        if self.mapcount[pfn]:
            return
        del self.mapcount[pfn]
        if self.gup_refs.get(pfn):
            self.zombies.add(pfn)
        else:
            self.mem.free(pfn)

    def _split_around(self, start: int, end: int) -> None:
        for hva in (start, end - PAGE):
            pte = self.pte(hva)
            covered = start <= thp_down(hva) and thp_down(hva) + THP_SIZE <= end
            if pte is not None and pte.huge and not covered:
                self.thp_split(hva)

    def mmap(self, start: int, end: int, writable: bool = True, thp: bool = False) -> None:
        self.vmas.append(Vma(start, end, writable, thp))
        self.vmas.sort(key=lambda v: v.start)

    def munmap(self, start: int, end: int) -> None:
        self._split_around(start, end)
        for hva in range(start, end, PAGE):
            self._drop(hva)
        new = []
        for v in self.vmas:
            if v.end <= start or end <= v.start:
                new.append(v)
                continue
            if v.start < start:
                new.append(attrs.evolve(v, end=start))
            if end < v.end:
                new.append(attrs.evolve(v, start=end))
        self.vmas = new

    def madvise_dontneed(self, start: int, end: int) -> None:
        self._split_around(start, end)
        for hva in range(start, end, PAGE):
            self._drop(hva)

    def _copy(self, old_pfn: int, new_pfn: int) -> None:
        value, _ = cache.cacheable_read(self.mem.line(old_pfn))
        self.mem.set_line(new_pfn, cache.cacheable_write(self.mem.line(new_pfn), value))

    def migrate(self, hva: int) -> None:
        """Move the page (or the whole THP) at ``hva`` to new physical pages."""
        pte = self.pte(hva)
        if pte is None:
            return
        hvas = ([thp_down(hva) + i * PAGE for i in range(THP_PAGES)] if pte.huge
                else [page_down(hva)])
        base = (self.mem.alloc_data(THP_PAGES, align=THP_PAGES) if pte.huge
                else self.mem.alloc_data())
        for i, h in enumerate(hvas):
            old = self.ptes[h]
            self._copy(old.pfn, base + i)
            self._drop(h)
            self._set(h, attrs.evolve(old, pfn=base + i))

    def thp_split(self, hva: int) -> None:
        for i in range(THP_PAGES):
            h = thp_down(hva) + i * PAGE
            if h in self.ptes:
                self._set(h, attrs.evolve(self.ptes[h], huge=False))

    def thp_collapse(self, hva: int) -> None:
        """khugepaged: copy the 2 MiB window into a fresh huge page."""
        base_hva = thp_down(hva)
        vma = self.vma_at(base_hva)
        base = self.mem.alloc_data(THP_PAGES, align=THP_PAGES)
        for i in range(THP_PAGES):
            h = base_hva + i * PAGE
            old = self.ptes.get(h)
            if old is not None:
                self._copy(old.pfn, base + i)
                self._drop(h)
            self._set(h, HostPte(base + i, vma.writable, huge=True))

    def ksm_merge(self, keep: int, merge: int) -> None:
        """``merge`` now maps ``keep``'s page, both read-only copy-on-write."""
        k = self.pte(keep)
        self._drop(merge)
        self._set(page_down(keep), HostPte(k.pfn, False, ksm=True))
        self._set(page_down(merge), HostPte(k.pfn, False, ksm=True))

    def cow_break(self, hva: int) -> None:
        """The writer gets a private copy; a KSM page stays copy-on-write for
        every remaining mapper, even the last one (as Linux keeps it)."""
        old = self.pte(hva)
        new = self.mem.alloc_data()
        self._copy(old.pfn, new)
        self._set(page_down(hva), HostPte(new, self.vma_at(hva).writable))

    def ksm_protect(self, keep: int) -> None:
        """KSM's ``write_protect_page`` on the page it keeps."""
        k = self.pte(keep)
        self._set(page_down(keep), HostPte(k.pfn, False, ksm=True))

    def mprotect(self, start: int, end: int, writable: bool) -> None:
        self._split_around(start, end)
        self._split_vmas(start, end)
        self.vmas = [attrs.evolve(v, writable=writable) if start <= v.start and v.end <= end
                     else v for v in self.vmas]
        for hva in range(start, end, PAGE):
            pte = self.ptes.get(hva)
            if pte is not None and not pte.ksm:
                self._set(hva, attrs.evolve(pte, writable=writable))

    def _split_vmas(self, start: int, end: int) -> None:
        out = []
        for v in self.vmas:
            cuts = sorted({v.start, v.end} | {x for x in (start, end) if v.start < x < v.end})
            out.extend(attrs.evolve(v, start=a, end=b) for a, b in zip(cuts, cuts[1:]))
        self.vmas = out

    def exit_mmap(self) -> None:
        for hva in list(self.ptes):
            self._drop(hva)
        self.vmas = []
