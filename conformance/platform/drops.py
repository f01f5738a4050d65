"""Pages a map-time block split drops from stage 2 without cache maintenance.

This is the signature of the known finding ``block-split-no-cmo``
(``docs/findings.md``, rules §6.6). KVM v6.12 replaces a cacheable block by a
table when a 4 KiB mapping is wanted inside it (``stage2_map_walk_leaf``
after ``-E2BIG``: break, install an empty table, map one page) and cleans only
the page it maps; the other pages of the block leave stage 2 with no
clean+invalidate, and no later unmap will clean them (they are no longer
mapped). Without FWB, a clean line left under a guest's non-cacheable write
can then shadow it for a cacheable reader (Arm ARM B2.11, D7.5.1).

:class:`DroppedPages` records each such page: ``hva -> pfn`` at the time of
the drop. A page stops being recorded when its pfn is cleaned+invalidated
(the stale line is gone), when the host drops the page (munmap, MADV_DONTNEED)
or when the machine has counted the finding on it. The machine consults it
only for candidates that declare the finding.
"""

from __future__ import annotations

from model import descriptors as d
from model.geometry import granule

PAGE = 1 << 12


class DroppedPages:
    def __init__(self, platform):
        self.p = platform
        #: Block leaves broken in the current candidate call:
        #: (table pfn, index, ipa, level, old descriptor).
        self.broken: list[tuple[int, int, int, int, int]] = []
        #: hva -> pfn of every page dropped without CMO and not cleaned since,
        #: and the same by pfn.
        self.pages: dict[int, int] = {}
        self.by_pfn: dict[int, set[int]] = {}

    def block_broken(self, pfn: int, idx: int, ipa: int, level: int, old: int) -> None:
        """A valid block leaf was replaced by an invalid entry (cheap: settled
        when the call returns)."""
        # With FWB the guest's accesses are cacheable whatever its SCTLR says:
        # no mismatched attributes, nothing to clean (rules §6.2).
        if not self.p.config.fwb and d.is_cacheable(old, False):
            self.broken.append((pfn, idx, ipa, level, old))

    def settle(self) -> None:
        """After a candidate call: a broken block that is now a table dropped
        every page of it that no leaf maps again and that was not cleaned."""
        broken, self.broken = self.broken, []
        p = self.p
        for pfn, idx, ipa, level, old in broken:
            entries = p.mem.tables.get(pfn)
            now = entries[idx] if entries is not None else 0
            if not (d.is_valid(now) and d.is_table(now, level)):
                continue  # unmapped (a later unmap cleans) or mapped again as a block
            size, oa = granule(level), d.pte_pa(old)
            remapped = {d.pte_pa(step.pte) + off
                        for step, _leaf in p.leaves(ipa, ipa + size)
                        for off in range(0, granule(step.level), PAGE)}
            for off in range(0, size, PAGE):
                pa = oa + off
                if pa in remapped or _cleaned(p.cleaned, pa):
                    continue
                slot = p.slot_for_gfn((ipa + off) >> 12)
                if slot is not None:
                    self._record(slot.gfn_to_hva((ipa + off) >> 12), pa >> 12)
                    p.counters["pages dropped by a block split without CMO"] += 1

    def _record(self, hva: int, pfn: int) -> None:
        self._drop(hva)
        self.pages[hva] = pfn
        self.by_pfn.setdefault(pfn, set()).add(hva)

    def _drop(self, hva: int) -> bool:
        pfn = self.pages.pop(hva, None)
        if pfn is None:
            return False
        hvas = self.by_pfn[pfn]
        hvas.discard(hva)
        if not hvas:
            del self.by_pfn[pfn]
        return True

    def cleaned(self, first_pfn: int, last_pfn: int) -> None:
        """DC CIVAC of pfns ``[first_pfn, last_pfn]`` (on the CMO path: only
        the pfns recorded are looked at)."""
        if not self.by_pfn:
            return
        if last_pfn - first_pfn < len(self.by_pfn):
            hit = [f for f in range(first_pfn, last_pfn + 1) if f in self.by_pfn]
        else:
            hit = [f for f in self.by_pfn if first_pfn <= f <= last_pfn]
        for pfn in hit:
            for hva in self.by_pfn.pop(pfn):
                del self.pages[hva]

    def forget(self, start: int, end: int) -> None:
        """The host dropped hvas ``[start, end)`` (munmap, MADV_DONTNEED)."""
        for hva in [h for h in self.pages if start <= h < end]:
            self._drop(hva)

    def take(self, hva: int) -> bool:
        """Is ``hva`` a dropped, uncleaned page? If so it is counted now and
        no longer recorded."""
        return self._drop(hva)


def _cleaned(ranges, pa: int) -> bool:
    return any(lo <= pa < hi for lo, hi in ranges)
