"""Simulated physical memory: page lifecycle, table contents, data lines.

Every page has a :class:`PageUse` lifecycle (rules §2.3, §7.3):

    FREE ──alloc_data──▶ DATA ──free──▶ FREED
    FREE ──alloc_table─▶ TABLE (refcount ≥ 1) ──refcount 0──▶ FREED
                          TABLE ──free_unlinked_table──▶ UNLINKED ──grace period──▶ FREED

Page frame numbers are never reused, so any later access to a FREED page is
recognisable as a use after free. Allocation is a simple counter, which keeps
runs deterministic.
"""

from __future__ import annotations

import enum

import attrs

from model.cache import FRESH_ZEROED, LineState

ENTRIES_PER_TABLE = 512


class PageUse(enum.Enum):
    DATA = "data"
    TABLE = "table"
    PGD = "pgd"
    UNLINKED = "unlinked (awaiting RCU grace period)"
    FREED = "freed"


#: Uses whose page holds descriptors. A tuple, not a set: membership is then
#: an identity test, where a set would call Enum.__hash__ (Python code) on
#: every descriptor read.
TABLE_USES = (PageUse.TABLE, PageUse.PGD, PageUse.UNLINKED)


class MemoryError_(Exception):
    """Misuse of a physical page (double free, use after free, wrong type)."""


@attrs.define
class PhysicalMemory:
    next_pfn: int = 0x80  # PA 0x80000: keeps PA 0 (and small PAs) meaningless
    use: dict[int, PageUse] = attrs.Factory(dict)
    refcount: dict[int, int] = attrs.Factory(dict)
    tables: dict[int, list[int]] = attrs.Factory(dict)
    lines: dict[int, LineState] = attrs.Factory(dict)

    def _alloc(self, n: int, use: PageUse, align: int = 1) -> int:
        pfn = -(-self.next_pfn // align) * align
        self.next_pfn = pfn + n
        for p in range(pfn, pfn + n):
            self.use[p] = use
        return pfn

    def alloc_data(self, n: int = 1, align: int = 1) -> int:
        """Host pages, zeroed through the cacheable alias (rules §6.1)."""
        pfn = self._alloc(n, PageUse.DATA, align)
        for p in range(pfn, pfn + n):
            self.lines[p] = FRESH_ZEROED
        return pfn

    def alloc_table(self, use: PageUse = PageUse.TABLE, n: int = 1) -> int:
        pfn = self._alloc(n, use, align=n)
        for p in range(pfn, pfn + n):
            self.tables[p] = [0] * ENTRIES_PER_TABLE
            self.refcount[p] = 1
        return pfn

    def page_use(self, pfn: int) -> PageUse | None:
        return self.use.get(pfn)

    def is_table(self, pfn: int) -> bool:
        return self.use.get(pfn) in TABLE_USES

    def free(self, pfn: int) -> None:
        if self.use.get(pfn) in (None, PageUse.FREED):
            raise MemoryError_(f"double free of page PA {pfn << 12:#x}")
        self.use[pfn] = PageUse.FREED
        self.refcount.pop(pfn, None)

    def line(self, pfn: int) -> LineState:
        return self.lines.get(pfn, LineState())

    def set_line(self, pfn: int, state: LineState) -> None:
        self.lines[pfn] = state

    def live_tables(self) -> set[int]:
        return {p for p, u in self.use.items()
                if u in (PageUse.TABLE, PageUse.UNLINKED)}
