"""The hardware stage-2 walker (rules §1.5, §2.2).

The walker reads table pages through a ``read_table(pfn) -> list[int]``
callback, so the platform decides what a read of a freed page means (a use
after free). It never writes: hardware AF updates are the platform's business.
"""

from __future__ import annotations

from typing import Callable, Iterator

import attrs

from conformance.protocol import FaultKind
from model import descriptors as d
from model.geometry import Geometry, granule, index

ReadTable = Callable[[int], list]


@attrs.frozen
class WalkStep:
    """One descriptor the walk read: entry ``index`` of ``table_pfn`` at ``level``,
    covering IPAs from ``ipa``."""

    level: int
    table_pfn: int
    index: int
    ipa: int
    pte: int

    @property
    def ptep(self) -> int:
        return (self.table_pfn << 12) | (self.index * 8)


@attrs.frozen
class Translation:
    ipa: int  # base of the leaf
    leaf: d.Leaf
    ptep: int

    @property
    def level(self) -> int:
        return self.leaf.level


@attrs.frozen
class WalkFault:
    kind: FaultKind
    level: int


def walk_from(read_table: ReadTable, table_pfn: int, level: int, ipa: int,
              path: list[WalkStep]) -> Translation | WalkFault:
    """Walk from ``table_pfn`` (a level-``level`` table) to a leaf or a fault.
    Access-flag and permission checks are the caller's (they depend on the
    access and on VTCR_EL2.HA)."""
    while True:
        idx = index(ipa, level)
        pte = read_table(table_pfn)[idx]
        base = ipa & ~(granule(level) - 1)
        path.append(WalkStep(level, table_pfn, idx, base, pte))
        if not d.is_valid(pte):
            return WalkFault(FaultKind.TRANSLATION, level)
        if d.is_table(pte, level):
            table_pfn = d.pte_pa(pte) >> 12
            level += 1
            continue
        if not d.is_leaf(pte, level):  # reserved L3 encoding, or an L0 block
            return WalkFault(FaultKind.TRANSLATION, level)
        return Translation(base, d.decode(pte, level), path[-1].ptep)


def walk(read_table: ReadTable, geometry: Geometry, pgd_pfn: int, ipa: int,
         path: list[WalkStep] | None = None) -> Translation | WalkFault:
    """A full walk from the (concatenated) PGD."""
    page, _ = geometry.pgd_slot(ipa)
    return walk_from(read_table, pgd_pfn + page, geometry.start_level, ipa,
                     [] if path is None else path)


def iter_entries(read_table: ReadTable, geometry: Geometry, pgd_pfn: int,
                 start: int, end: int) -> Iterator[WalkStep]:
    """Every valid descriptor (tables and leaves) reachable from the PGD whose
    span overlaps ``[start, end)``, parents before children."""
    start = max(start, 0)
    end = min(end, geometry.ipa_limit)
    span = granule(geometry.start_level) * 512
    for page in range(geometry.pgd_pages):
        base = page * span
        if base < end and start < base + span:
            yield from _iter_table(read_table, pgd_pfn + page, geometry.start_level,
                                   base, start, end)


def _iter_table(read_table, table_pfn, level, base, start, end):
    size = granule(level)
    first = max(0, (start - base) // size)
    last = min(511, (end - 1 - base) // size)
    entries = read_table(table_pfn)
    # Most entries are invalid: find the valid ones in one pass (hot path).
    for idx in [i for i in range(first, last + 1) if entries[i] & d.PTE_VALID]:
        pte = entries[idx]
        ipa = base + idx * size
        yield WalkStep(level, table_pfn, idx, ipa, pte)
        if d.is_table(pte, level):
            yield from _iter_table(read_table, d.pte_pa(pte) >> 12, level + 1, ipa,
                                   start, end)


def iter_leaves(read_table: ReadTable, geometry: Geometry, pgd_pfn: int,
                start: int, end: int) -> Iterator[tuple[WalkStep, d.Leaf]]:
    for step in iter_entries(read_table, geometry, pgd_pfn, start, end):
        if not d.is_table(step.pte, step.level):
            yield step, d.decode(step.pte, step.level)


def iter_subtree(read_table: ReadTable, table_pfn: int, level: int,
                 base: int) -> Iterator[WalkStep]:
    """Every valid descriptor below a table page (for linking/unlinking)."""
    yield from _iter_table(read_table, table_pfn, level, base, base,
                           base + granule(level) * 512)
