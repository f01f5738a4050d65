"""Tests for model.walker: the hardware stage-2 walk over hand-built tables
(rules §1.1, §1.5, §2.2)."""

import pytest

from conformance.protocol import FaultKind
from model import descriptors as d
from model.descriptors import Prot, Table, make_leaf
from model.geometry import Geometry, index
from model.memory import PageUse, PhysicalMemory
from model.walker import (
    Translation,
    WalkFault,
    iter_entries,
    iter_leaves,
    iter_subtree,
    walk,
    walk_from,
)

MiB, GiB = 1 << 20, 1 << 30
RW = Prot.R | Prot.W


class World:
    """A PhysicalMemory with a concatenated PGD for ``ipa_bits`` and helpers
    to install table and leaf descriptors by hand."""

    def __init__(self, ipa_bits=40):
        self.mem = PhysicalMemory()
        self.geo = Geometry(ipa_bits)
        self.pgd = self.mem.alloc_table(PageUse.PGD, self.geo.pgd_pages)
        self.reads = []

    def read_table(self, pfn):
        self.reads.append(pfn)
        return self.mem.tables[pfn]

    def table_for(self, ipa, level):
        """The table page holding the level-``level`` entry for ``ipa``,
        creating intermediate tables as needed."""
        page, _ = self.geo.pgd_slot(ipa)
        pfn, lvl = self.pgd + page, self.geo.start_level
        while lvl < level:
            entries = self.mem.tables[pfn]
            idx = index(ipa, lvl)
            if not d.is_table(entries[idx], lvl):
                child = self.mem.alloc_table()
                entries[idx] = Table(child << 12).encode()
            pfn, lvl = d.pte_pa(entries[idx]) >> 12, lvl + 1
        return pfn

    def set(self, ipa, level, pte):
        pfn = self.table_for(ipa, level)
        self.mem.tables[pfn][index(ipa, level)] = pte
        return pfn

    def map(self, ipa, level, pa, prot=RW):
        return self.set(ipa, level, make_leaf(pa, level, prot, fwb=False))

    def walk(self, ipa, path=None):
        return walk(self.read_table, self.geo, self.pgd, ipa, path)


# ------------------------------------------------------- translation faults
def test_empty_pgd_gives_translation_fault_at_start_level():
    w = World(40)
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 1)


def test_empty_pgd_32_bit_faults_at_level_2():
    w = World(32)
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 2)


def test_empty_pgd_48_bit_faults_at_level_0():
    w = World(48)
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 0)


def test_missing_l2_entry_faults_at_level_2():
    w = World(40)
    w.table_for(0x1000, 2)  # L1 entry -> empty L2 table
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 2)


def test_missing_l3_entry_faults_at_level_3():
    w = World(40)
    w.map(0x2000, 3, 0x8000_0000)
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 3)
    assert w.walk(0x3000) == WalkFault(FaultKind.TRANSLATION, 3)
    assert isinstance(w.walk(0x2000), Translation)


@pytest.mark.parametrize("pte", [d.INVALID_PTE_LOCKED, 0x4 << 2])  # LOCKED, owner id
def test_locked_and_annotated_entries_give_translation_faults(pte):
    w = World(40)
    w.set(0x5000, 3, pte)
    assert w.walk(0x5000) == WalkFault(FaultKind.TRANSLATION, 3)


def test_fault_path_records_every_descriptor_read():
    w = World(40)
    w.table_for(0x1000, 3)
    path = []
    assert w.walk(0x1000, path) == WalkFault(FaultKind.TRANSLATION, 3)
    assert [s.level for s in path] == [1, 2, 3]
    assert path[-1].pte == 0
    assert path[0].table_pfn == w.pgd


# ------------------------------------------------------------ translations
def test_4k_page_at_l3_translates():
    w = World(40)
    ptep_table = w.map(0x20_3000, 3, 0x8765_4000)
    t = w.walk(0x20_3abc)
    assert isinstance(t, Translation)
    assert t.ipa == 0x20_3000
    assert t.level == 3
    assert t.leaf.oa == 0x8765_4000
    assert t.leaf.read and t.leaf.write and not t.leaf.exec
    assert t.ptep == (ptep_table << 12) | (index(0x20_3000, 3) * 8)


def test_2m_block_at_l2_translates():
    w = World(40)
    w.map(GiB + 4 * MiB, 2, 0x1_0000_0000, Prot.R)
    path = []
    t = w.walk(GiB + 4 * MiB + 0x1_2345, path)
    assert isinstance(t, Translation)
    assert t.ipa == GiB + 4 * MiB
    assert t.level == 2
    assert t.leaf.oa == 0x1_0000_0000 and not t.leaf.write
    assert [s.level for s in path] == [1, 2]
    assert t.ptep == path[-1].ptep


def test_1g_block_at_l1_translates():
    w = World(40)
    w.map(3 * GiB, 1, 5 * GiB)
    t = w.walk(3 * GiB + 0x1234_5000)
    assert isinstance(t, Translation)
    assert (t.ipa, t.level, t.leaf.oa) == (3 * GiB, 1, 5 * GiB)


def test_block_does_not_cover_neighbour():
    w = World(40)
    w.map(2 * MiB, 2, 0x4000_0000)
    assert w.walk(4 * MiB) == WalkFault(FaultKind.TRANSLATION, 2)
    assert w.walk(2 * MiB - 0x1000) == WalkFault(FaultKind.TRANSLATION, 2)


def test_af_clear_leaf_is_returned_to_the_caller():
    # access-flag checks are the caller's (walker docstring)
    w = World(40)
    pte = make_leaf(0x8000_0000, 3, RW, fwb=False) & ~d.AF
    w.set(0x1000, 3, pte)
    t = w.walk(0x1000)
    assert isinstance(t, Translation) and not t.leaf.af


def test_walk_path_step_fields():
    w = World(40)
    w.map(0x20_3000, 3, 0x8765_4000)
    path = []
    w.walk(0x20_3000, path)
    l1, l2, l3 = path
    assert (l1.level, l1.index, l1.ipa) == (1, 0, 0)
    assert (l2.level, l2.index, l2.ipa) == (2, 1, 2 * MiB)
    assert (l3.level, l3.index, l3.ipa) == (3, 3, 0x20_3000)
    assert d.pte_pa(l1.pte) >> 12 == l2.table_pfn
    assert d.pte_pa(l2.pte) >> 12 == l3.table_pfn


# ------------------------------------------------------- concatenated PGD
def test_40_bit_ipa_uses_second_pgd_page_above_512_gib():
    w = World(40)
    ipa = 512 * GiB + 3 * GiB
    assert w.geo.pgd_pages == 2
    w.map(ipa, 1, 7 * GiB)
    # the L1 entry lives in the second PGD page, at index 3
    assert w.mem.tables[w.pgd + 1][3] != 0
    assert w.mem.tables[w.pgd][3] == 0
    path = []
    t = w.walk(ipa + 0x5000, path)
    assert isinstance(t, Translation)
    assert (t.ipa, t.leaf.oa) == (ipa, 7 * GiB)
    assert path[0].table_pfn == w.pgd + 1
    # the same index in the first page does not translate
    assert w.walk(3 * GiB) == WalkFault(FaultKind.TRANSLATION, 1)


def test_40_bit_top_of_ipa_space():
    w = World(40)
    top = (1 << 40) - 0x1000
    w.map(top, 3, 0x9000_0000)
    t = w.walk(top)
    assert isinstance(t, Translation) and t.leaf.oa == 0x9000_0000


def test_32_bit_ipa_uses_four_pgd_pages_at_level_2():
    w = World(32)
    ipa = 3 * GiB + 2 * MiB
    w.map(ipa, 2, 0x4000_0000)
    assert w.mem.tables[w.pgd + 3][1] != 0
    t = w.walk(ipa)
    assert isinstance(t, Translation) and t.level == 2


def test_walk_outside_ipa_space_is_rejected():
    w = World(40)
    with pytest.raises(ValueError):
        w.walk(1 << 40)


# ---------------------------------------------------------------- walk_from
def test_walk_from_lower_level_table():
    w = World(40)
    w.map(GiB + 2 * MiB + 0x5000, 3, 0x8000_0000)
    l3 = w.table_for(GiB + 2 * MiB, 3)
    path = []
    t = walk_from(w.read_table, l3, 3, GiB + 2 * MiB + 0x5000, path)
    assert isinstance(t, Translation) and t.leaf.oa == 0x8000_0000
    assert len(path) == 1 and path[0].table_pfn == l3
    l2 = w.table_for(GiB, 2)
    path = []
    t = walk_from(w.read_table, l2, 2, GiB + 2 * MiB + 0x5000, path)
    assert isinstance(t, Translation)
    assert [s.level for s in path] == [2, 3]
    assert w.pgd not in w.reads
    assert walk_from(w.read_table, l3, 3, GiB + 2 * MiB + 0x6000, []) == \
        WalkFault(FaultKind.TRANSLATION, 3)


def test_walk_from_stale_cached_table_pointer_uses_that_table():
    # a walk cache pointer survives a change of the parent entry: the
    # hardware keeps using the old table until a TLBI removes the pointer
    w = World(40)
    w.map(0x1000, 3, 0x8000_0000)
    old_l3 = w.table_for(0x1000, 3)
    w.set(0, 2, 0)  # unlink the L3 table from the L2 entry
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 2)
    t = walk_from(w.read_table, old_l3, 3, 0x1000, [])
    assert isinstance(t, Translation)


# ------------------------------------------------------------- iteration
def _populated():
    w = World(40)
    w.map(0x1000, 3, 0x8000_0000)
    w.map(0x3000, 3, 0x8000_2000)
    w.map(4 * MiB, 2, 0x4000_0000)
    w.map(GiB, 1, 2 * GiB)
    w.map(512 * GiB + 0x7000, 3, 0x9000_0000)
    return w


def test_iter_entries_parents_before_children():
    w = _populated()
    steps = list(iter_entries(w.read_table, w.geo, w.pgd, 0, 1 << 40))
    seen_tables = set()
    for s in steps:
        assert d.is_valid(s.pte)
        if s.level > w.geo.start_level:
            assert s.table_pfn in seen_tables, "child yielded before its parent"
        if d.is_table(s.pte, s.level):
            seen_tables.add(d.pte_pa(s.pte) >> 12)
    # every valid descriptor: 2 L1 tables + 1 L1 block + 2 L2 tables + 1 L2 block + 3 pages
    assert len(steps) == 9


def test_iter_entries_only_entries_overlapping_range():
    w = _populated()
    steps = list(iter_entries(w.read_table, w.geo, w.pgd, 0x3000, 0x4000))
    assert [(s.level, s.ipa) for s in steps] == [(1, 0), (2, 0), (3, 0x3000)]
    steps = list(iter_entries(w.read_table, w.geo, w.pgd, 5 * MiB, 5 * MiB + 1))
    assert [(s.level, s.ipa) for s in steps] == [(1, 0), (2, 4 * MiB)]
    assert list(iter_entries(w.read_table, w.geo, w.pgd, 0x4000, 0x5000)) == \
        [s for s in iter_entries(w.read_table, w.geo, w.pgd, 0, 0x1000)
         if s.level < 3]


def test_iter_entries_range_end_exclusive():
    w = _populated()
    steps = list(iter_entries(w.read_table, w.geo, w.pgd, 0, 0x1000))
    assert all(s.level < 3 for s in steps)


def test_iter_entries_second_pgd_page_only():
    w = _populated()
    steps = list(iter_entries(w.read_table, w.geo, w.pgd, 512 * GiB, 1 << 40))
    assert [(s.level, s.ipa) for s in steps] == [
        (1, 512 * GiB), (2, 512 * GiB), (3, 512 * GiB + 0x7000)]
    assert steps[0].table_pfn == w.pgd + 1


def test_iter_entries_clamps_to_ipa_space():
    w = _populated()
    assert len(list(iter_entries(w.read_table, w.geo, w.pgd, -5, 1 << 50))) == 9


def test_iter_leaves():
    w = _populated()
    got = [(s.ipa, leaf.level, leaf.oa)
           for s, leaf in iter_leaves(w.read_table, w.geo, w.pgd, 0, 1 << 40)]
    assert got == [(0x1000, 3, 0x8000_0000), (0x3000, 3, 0x8000_2000),
                   (4 * MiB, 2, 0x4000_0000), (GiB, 1, 2 * GiB),
                   (512 * GiB + 0x7000, 3, 0x9000_0000)]


def test_iter_leaves_block_partially_covered_is_yielded_whole():
    w = _populated()
    got = list(iter_leaves(w.read_table, w.geo, w.pgd, GiB + 5 * MiB, GiB + 6 * MiB))
    assert len(got) == 1
    step, leaf = got[0]
    assert step.ipa == GiB and leaf.size == GiB


def test_iter_subtree():
    w = _populated()
    l2 = w.table_for(0, 2)
    got = [(s.level, s.ipa) for s in iter_subtree(w.read_table, l2, 2, 0)]
    assert got == [(2, 0), (3, 0x1000), (3, 0x3000), (2, 4 * MiB)]


# ------------------------------------------- reserved / unsupported encodings
def test_reserved_l3_encoding_is_a_translation_fault():
    w = World(40)
    w.set(0x1000, 3, make_leaf(0x8000_0000, 3, RW, fwb=False) & ~d.PTE_TYPE)
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 3)


def test_l0_block_is_a_translation_fault():
    w = World(48)
    leaf_bits = make_leaf(GiB, 1, RW, fwb=False)  # a block encoding (type bit 0)
    w.set(0, 0, leaf_bits)
    assert w.walk(0x1000) == WalkFault(FaultKind.TRANSLATION, 0)
