"""The host mm on the platform (DESIGN §2, §5): VMM accesses, MMU-notifier
invalidations and aging, GUP.

A host operation runs as Linux runs it: ``invalidate_range_start``, the
change to the host page tables, ``invalidate_range_end`` (rules §5.1); a
THP that a range only partly covers is split first (``split_huge_pmd``
raises its own CLEAR over the whole PMD), and a KSM merge write-protects the
kept page first.
"""

from __future__ import annotations

from typing import Callable

from conformance.protocol import NotifierEvent, NotifierRange
from model import cache
from model.host import PAGE, THP_SIZE, HostPage, page_down, thp_down


class HostEvents:
    """The part of :class:`~conformance.platform.core.Platform` that plays the
    host (a mixin: the state lives on the platform)."""

    def host_touch(self, hva: int, write: bool) -> int | None:
        """A VMM access faults the page in (breaking KSM sharing on write)."""
        if self.host.needs_cow(hva, write):
            self.notify(NotifierRange(page_down(hva), page_down(hva) + PAGE,
                                      NotifierEvent.CLEAR),
                        lambda: self.host.cow_break(hva))
        pte = self.host.fault_in(hva, write)
        return None if pte is None else pte.pfn

    def vmm_write(self, hva: int, value: int) -> bool:
        pfn = self.host_touch(hva, True)
        if pfn is None:
            return False
        self.mem.set_line(pfn, cache.cacheable_write(self.mem.line(pfn), value))
        return True

    def vmm_read(self, hva: int) -> int | None:
        pfn = self.host_touch(hva, False)
        if pfn is None:
            return None
        value, line = cache.cacheable_read(self.mem.line(pfn))
        self.mem.set_line(pfn, line)
        return value

    def notify(self, rng: NotifierRange, mutate: Callable[[], None]) -> None:
        """``invalidate_range_start`` → host change → ``invalidate_range_end``."""
        self.counters[f"notifier: {rng.event.value}"] += 1
        mapped = self.mapped_pages(rng.start, rng.end)
        self.call("invalidate_range_start", rng)
        # In progress once start has returned, not before: a concurrent fault
        # may still install before start takes mmu_lock (start then unmaps it).
        self.notifiers_in_progress.append(rng)
        self.counters["pages unmapped by notifiers"] += \
            mapped - self.mapped_pages(rng.start, rng.end)
        self.monitors.after_invalidate_start(rng)
        if self.in_task():  # a fault may run between start and the change
            self.yield_point("host pte change", rng.event.value)
        mutate()
        self.notifiers_in_progress.remove(rng)
        self.call("invalidate_range_end", rng)
        self.monitors.after_invalidate_end(rng)

    def host_op(self, op: str, start: int, end: int, other: int | None = None) -> None:
        h = self.host
        events = {
            "munmap": (NotifierEvent.UNMAP, lambda: h.munmap(start, end)),
            "madvise_dontneed": (NotifierEvent.CLEAR, lambda: h.madvise_dontneed(start, end)),
            "migrate": (NotifierEvent.MIGRATE, lambda: h.migrate(start)),
            "thp_split": (NotifierEvent.CLEAR, lambda: h.thp_split(start)),
            "thp_collapse": (NotifierEvent.CLEAR, lambda: h.thp_collapse(start)),
            "mprotect_ro": (NotifierEvent.PROTECTION_VMA, lambda: h.mprotect(start, end, False)),
            "mprotect_rw": (NotifierEvent.PROTECTION_UPGRADE,
                            lambda: h.mprotect(start, end, True)),
            "ksm_merge": (NotifierEvent.CLEAR, lambda: h.ksm_merge(other, start)),
        }
        event, mutate = events[op]
        for hva in (start, end - PAGE):  # split_huge_pmd: CLEAR over the whole PMD
            pte = h.pte(hva)
            window = thp_down(hva)
            if pte is not None and pte.huge and not (start <= window and window + THP_SIZE <= end) \
                    and op not in ("thp_split", "thp_collapse", "migrate"):
                self.notify(NotifierRange(window, window + THP_SIZE, NotifierEvent.CLEAR),
                            lambda w=window: h.thp_split(w))
        if op == "ksm_merge":  # write_protect_page on the kept page first
            self.notify(NotifierRange(page_down(other), page_down(other) + PAGE,
                                      NotifierEvent.CLEAR), lambda: h.ksm_protect(other))
        if op in ("thp_split", "thp_collapse"):
            start, end = thp_down(start), thp_down(start) + THP_SIZE
        elif op == "migrate":
            pte = h.pte(start)
            if pte is not None and pte.huge:
                start, end = thp_down(start), thp_down(start) + THP_SIZE
        self.notify(NotifierRange(start, end, event), mutate)
        if op in ("munmap", "madvise_dontneed"):
            self.drops.forget(start, end)  # the page and any stale line with it are gone

    def host_mmap(self, start: int, end: int, thp: bool) -> None:
        self.host.mmap(start, end, writable=True, thp=thp)

    def aging(self, op: str, start: int, end: int) -> bool:
        rng = NotifierRange(start, end, NotifierEvent.CLEAR)
        before = self.monitors.before_aging(rng)
        self.ctx.aging = True
        try:
            young = self.call(op, rng, returns=bool)
        finally:
            self.ctx.aging = False
        self.counters[f"aging: {op}"] += 1
        self.monitors.after_aging(op, rng, before, young)
        return young

    def gup(self, hva: int, write: bool) -> HostPage | None:
        pfn = self.host_touch(hva, write)
        if pfn is None:
            return None
        pte = self.host.pte(hva)
        self.host.get_page(pfn)
        return HostPage(pfn, pte.writable)
