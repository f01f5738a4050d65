"""Per-vCPU TLBs: leaf entries and walk-cache entries (rules §1.5, §2.6).

Architectural rules encoded here and in the platform that fills the TLB:

* entries that would give a translation, access-flag or address-size fault are
  never cached; entries that give a permission fault may be (§1.5 rule 1);
* the hardware may cache any valid translation at any time (speculative
  walks), and keeps it until a TLBI or an eviction removes it; the platform
  therefore inserts every published valid leaf and table entry into every
  vCPU's TLB, and a stale entry, once cached, is kept in preference to a newer
  one for the same address (the adversarial choice, DESIGN §2);
* ``TLBI IPAS2E1(IS)`` with a level hint removes leaf entries of that level
  covering the IPA (a wrong hint may invalidate nothing, §1.5 rule 4) and, being
  the non-leaf form, every walk-cache entry covering it (rule 3); without a
  hint it removes every entry covering the IPA;
* range and VMID invalidations remove everything they cover.
"""

from __future__ import annotations

import attrs

from model.geometry import granule

_GRANULE = tuple(granule(level) if level else 1 << 39 for level in range(4))


@attrs.frozen
class TlbEntry:
    """A cached leaf translation: IPA ``[ipa, ipa + granule(level))`` → ``oa``."""

    ipa: int
    level: int
    oa: int
    read: bool
    write: bool
    exec: bool
    memattr: int

    @property
    def size(self) -> int:
        return _GRANULE[self.level]

    def covers(self, ipa: int) -> bool:
        return self.ipa <= ipa < self.ipa + _GRANULE[self.level]

    def overlaps(self, start: int, end: int) -> bool:
        return self.ipa < end and start < self.ipa + _GRANULE[self.level]

    def translate(self, ipa: int) -> int:
        return self.oa + (ipa - self.ipa)

    def describe(self) -> str:
        perms = "".join(c if f else "-" for c, f in
                        (("R", self.read), ("W", self.write), ("X", self.exec)))
        return f"IPA {self.ipa:#x} -> PA {self.oa:#x} L{self.level} {perms}"


@attrs.frozen
class WalkEntry:
    """A cached table descriptor: the level-``level`` entry covering
    ``[ipa, ipa + granule(level))`` points at table page ``table_pfn``."""

    ipa: int
    level: int
    table_pfn: int

    def covers(self, ipa: int) -> bool:
        return self.ipa <= ipa < self.ipa + _GRANULE[self.level]

    def overlaps(self, start: int, end: int) -> bool:
        return self.ipa < end and start < self.ipa + _GRANULE[self.level]


@attrs.define
class Tlb:
    leaves: dict[tuple[int, int], TlbEntry] = attrs.Factory(dict)
    walks: dict[tuple[int, int], WalkEntry] = attrs.Factory(dict)

    def lookup(self, ipa: int) -> list[TlbEntry]:
        """All leaf entries covering ``ipa``; more than one is a TLB conflict."""
        hits = []
        for level in (1, 2, 3):
            base = ipa & ~(granule(level) - 1)
            entry = self.leaves.get((level, base))
            if entry is not None:
                hits.append(entry)
        return hits

    def overlapping(self, start: int, end: int) -> list[TlbEntry]:
        """Leaf entries overlapping ``[start, end)``, by level then IPA. Looked
        up by key (a split publishes 512 pages into TLBs of 512 entries each);
        scanned instead when the range holds more slots than the TLB entries."""
        slots = [(level, start & ~(_GRANULE[level] - 1)) for level in (1, 2, 3)]
        if sum(-(-(end - base) // _GRANULE[lv]) for lv, base in slots) > len(self.leaves):
            return sorted((e for e in self.leaves.values() if e.overlaps(start, end)),
                          key=lambda e: (e.level, e.ipa))
        out = []
        for level, base in slots:
            for ipa in range(base, end, _GRANULE[level]):
                entry = self.leaves.get((level, ipa))
                if entry is not None:
                    out.append(entry)
        return out

    def deepest_walk(self, ipa: int) -> WalkEntry | None:
        for level in (2, 1, 0):
            base = ipa & ~(granule(level) - 1)
            entry = self.walks.get((level, base))
            if entry is not None:
                return entry
        return None

    def insert(self, entry: TlbEntry) -> None:
        self.leaves.setdefault((entry.level, entry.ipa), entry)

    def insert_walk(self, entry: WalkEntry) -> None:
        self.walks.setdefault((entry.level, entry.ipa), entry)

    def invalidate_ipa(self, ipa: int, level: int | None) -> int:
        """``TLBI IPAS2E1`` (+``VMALLE1``). Returns how many entries went."""
        leaves = self.leaves
        doomed = [k for k in ((lv, ipa & ~(_GRANULE[lv] - 1)) for lv in (1, 2, 3))
                  if k in leaves and (level is None or k[0] == level)]
        walks = [k for k in ((lv, ipa & ~(_GRANULE[lv] - 1)) for lv in (0, 1, 2))
                 if k in self.walks]
        for k in doomed:
            del self.leaves[k]
        for k in walks:
            del self.walks[k]
        return len(doomed) + len(walks)

    def invalidate_range(self, start: int, end: int) -> int:
        doomed = [k for k, e in self.leaves.items() if e.overlaps(start, end)]
        walks = [k for k, e in self.walks.items() if e.overlaps(start, end)]
        for k in doomed:
            del self.leaves[k]
        for k in walks:
            del self.walks[k]
        return len(doomed) + len(walks)

    def invalidate_all(self) -> int:
        n = len(self.leaves) + len(self.walks)
        self.leaves.clear()
        self.walks.clear()
        return n

    def references_table(self, pfn: int) -> WalkEntry | None:
        for entry in self.walks.values():
            if entry.table_pfn == pfn:
                return entry
        return None
