"""Tests for model.tlb: per-vCPU leaf and walk-cache entries (rules §1.5, §2.6)."""

import pytest

from model.tlb import Tlb, TlbEntry, WalkEntry

MiB, GiB = 1 << 20, 1 << 30
NORMAL = 0xF


def leaf(ipa, level, oa, write=True):
    return TlbEntry(ipa=ipa, level=level, oa=oa, read=True, write=write, exec=False,
                    memattr=NORMAL)


# --------------------------------------------------------------- entries
def test_entry_geometry():
    e = leaf(2 * MiB, 2, 0x4000_0000)
    assert e.size == 2 * MiB
    assert e.covers(2 * MiB) and e.covers(4 * MiB - 1)
    assert not e.covers(4 * MiB) and not e.covers(2 * MiB - 1)
    assert e.translate(2 * MiB + 0x1234) == 0x4000_1234
    assert e.overlaps(0, 2 * MiB + 1) and not e.overlaps(0, 2 * MiB)
    assert not e.overlaps(4 * MiB, 5 * MiB)


def test_describe_names_permissions():
    text = leaf(0x1000, 3, 0x80000, write=False).describe()
    assert "0x1000" in text and "0x80000" in text and "R--" in text


def test_walk_entry_geometry():
    w = WalkEntry(ipa=GiB, level=1, table_pfn=0x90)
    assert w.covers(GiB) and w.covers(2 * GiB - 1) and not w.covers(2 * GiB)
    assert w.overlaps(2 * GiB - 1, 3 * GiB) and not w.overlaps(2 * GiB, 3 * GiB)


# ------------------------------------------------------- insert / lookup
def test_lookup_empty():
    assert Tlb().lookup(0x1000) == []


def test_lookup_finds_covering_entry_only():
    tlb = Tlb()
    e = leaf(0x5000, 3, 0x80000)
    tlb.insert(e)
    assert tlb.lookup(0x5000) == [e]
    assert tlb.lookup(0x5fff) == [e]
    assert tlb.lookup(0x6000) == []
    assert tlb.lookup(0x4fff) == []


def test_lookup_block_covers_inner_addresses():
    tlb = Tlb()
    e = leaf(GiB, 1, 2 * GiB)
    tlb.insert(e)
    assert tlb.lookup(GiB + 123 * MiB) == [e]


def test_insert_keeps_the_first_entry_for_the_same_key():
    tlb = Tlb()
    stale = leaf(0x5000, 3, 0x80000)
    fresh = leaf(0x5000, 3, 0x90000)
    tlb.insert(stale)
    tlb.insert(fresh)
    assert tlb.lookup(0x5000) == [stale]
    assert len(tlb.leaves) == 1


def test_insert_walk_keeps_the_first_entry():
    tlb = Tlb()
    stale, fresh = WalkEntry(0, 2, 0x90), WalkEntry(0, 2, 0x91)
    tlb.insert_walk(stale)
    tlb.insert_walk(fresh)
    assert tlb.deepest_walk(0x1000) == stale


def test_lookup_returns_entries_of_several_levels_as_conflict():
    tlb = Tlb()
    block = leaf(2 * MiB, 2, 0x4000_0000)
    page = leaf(2 * MiB + 0x3000, 3, 0x9000_0000)
    huge = leaf(0, 1, 0x8000_0000)
    for e in (block, page, huge):
        tlb.insert(e)
    hits = tlb.lookup(2 * MiB + 0x3000)
    assert len(hits) == 3
    assert set(hits) == {block, page, huge}
    # outside the page, only the two blocks
    assert set(tlb.lookup(2 * MiB)) == {block, huge}


def test_overlapping():
    tlb = Tlb()
    a, b = leaf(0x1000, 3, 0x80000), leaf(2 * MiB, 2, 0x4000_0000)
    tlb.insert(a)
    tlb.insert(b)
    assert tlb.overlapping(0, 0x1000) == []
    assert tlb.overlapping(0, 0x2000) == [a]
    assert set(tlb.overlapping(0, 3 * MiB)) == {a, b}


# ---------------------------------------------------------- invalidate_ipa
def test_invalidate_ipa_with_right_level_removes_leaf():
    tlb = Tlb()
    tlb.insert(leaf(0x5000, 3, 0x80000))
    assert tlb.invalidate_ipa(0x5000, 3) == 1
    assert tlb.lookup(0x5000) == []


def test_invalidate_ipa_inside_a_block_with_right_level():
    tlb = Tlb()
    tlb.insert(leaf(2 * MiB, 2, 0x4000_0000))
    tlb.invalidate_ipa(2 * MiB + 0x7000, 2)
    assert tlb.lookup(2 * MiB) == []


@pytest.mark.parametrize("hint", [1, 2])
def test_invalidate_ipa_with_wrong_level_hint_leaves_the_leaf(hint):
    # rules §1.5 rule 4: a wrong TTL hint need not invalidate
    tlb = Tlb()
    e = leaf(0x5000, 3, 0x80000)
    tlb.insert(e)
    assert tlb.invalidate_ipa(0x5000, hint) == 0
    assert tlb.lookup(0x5000) == [e]


def test_invalidate_ipa_without_hint_removes_every_covering_leaf():
    tlb = Tlb()
    entries = [leaf(0, 1, 0x8000_0000), leaf(2 * MiB, 2, 0x4000_0000),
               leaf(2 * MiB + 0x3000, 3, 0x9000_0000)]
    other = leaf(2 * MiB + 0x4000, 3, 0x9000_1000)
    for e in entries + [other]:
        tlb.insert(e)
    assert tlb.invalidate_ipa(2 * MiB + 0x3000, None) == 3
    assert tlb.lookup(2 * MiB + 0x3000) == []
    assert tlb.lookup(2 * MiB + 0x4000) == [other]


def test_invalidate_ipa_with_hint_only_removes_that_level():
    tlb = Tlb()
    block, page = leaf(2 * MiB, 2, 0x4000_0000), leaf(2 * MiB, 3, 0x9000_0000)
    tlb.insert(block)
    tlb.insert(page)
    tlb.invalidate_ipa(2 * MiB, 3)
    assert tlb.lookup(2 * MiB) == [block]


def test_invalidate_ipa_does_not_touch_other_addresses():
    tlb = Tlb()
    keep = leaf(0x6000, 3, 0x81000)
    tlb.insert(leaf(0x5000, 3, 0x80000))
    tlb.insert(keep)
    tlb.invalidate_ipa(0x5000, None)
    assert list(tlb.leaves.values()) == [keep]


@pytest.mark.parametrize("hint", [None, 1, 2, 3])
def test_invalidate_ipa_removes_covering_walk_entries_regardless_of_level(hint):
    # rules §1.5 rule 3: IPAS2E1 is the non-leaf form
    tlb = Tlb()
    ipa = GiB + 2 * MiB + 0x3000
    for w in (WalkEntry(0, 0, 0x90), WalkEntry(GiB, 1, 0x91),
              WalkEntry(GiB + 2 * MiB, 2, 0x92)):
        tlb.insert_walk(w)
    far = WalkEntry(GiB + 4 * MiB, 2, 0x93)
    tlb.insert_walk(far)
    tlb.invalidate_ipa(ipa, hint)
    assert tlb.deepest_walk(ipa) is None
    assert list(tlb.walks.values()) == [far]


def test_invalidate_ipa_counts_leaves_and_walks():
    tlb = Tlb()
    tlb.insert(leaf(0x5000, 3, 0x80000))
    tlb.insert_walk(WalkEntry(0, 2, 0x90))
    assert tlb.invalidate_ipa(0x5000, 3) == 2


# ------------------------------------------------------ range and all
def test_invalidate_range_removes_everything_overlapping():
    tlb = Tlb()
    inside = [leaf(0x2000, 3, 0x80000), leaf(0x3000, 3, 0x81000)]
    block = leaf(0, 2, 0x4000_0000)  # overlaps [0x2000, 0x4000)
    outside = leaf(2 * MiB, 2, 0x4020_0000)
    for e in inside + [block, outside]:
        tlb.insert(e)
    tlb.insert_walk(WalkEntry(0, 2, 0x90))
    tlb.insert_walk(WalkEntry(2 * MiB, 2, 0x91))
    assert tlb.invalidate_range(0x2000, 0x4000) == 4
    assert list(tlb.leaves.values()) == [outside]
    assert list(tlb.walks.values()) == [WalkEntry(2 * MiB, 2, 0x91)]


def test_invalidate_range_end_is_exclusive():
    tlb = Tlb()
    e = leaf(0x4000, 3, 0x80000)
    tlb.insert(e)
    assert tlb.invalidate_range(0x2000, 0x4000) == 0
    assert tlb.lookup(0x4000) == [e]


def test_invalidate_all():
    tlb = Tlb()
    tlb.insert(leaf(0x5000, 3, 0x80000))
    tlb.insert(leaf(GiB, 1, 0))
    tlb.insert_walk(WalkEntry(0, 1, 0x90))
    assert tlb.invalidate_all() == 3
    assert tlb.leaves == {} and tlb.walks == {}
    assert tlb.invalidate_all() == 0


# ------------------------------------------------------ walk cache queries
def test_deepest_walk_picks_the_lowest_table_level():
    tlb = Tlb()
    ipa = GiB + 2 * MiB + 0x3000
    l0, l1, l2 = WalkEntry(0, 0, 0x90), WalkEntry(GiB, 1, 0x91), WalkEntry(GiB + 2 * MiB, 2, 0x92)
    tlb.insert_walk(l0)
    assert tlb.deepest_walk(ipa) == l0
    tlb.insert_walk(l1)
    assert tlb.deepest_walk(ipa) == l1
    tlb.insert_walk(l2)
    assert tlb.deepest_walk(ipa) == l2
    # an L2 entry for a different 2 MiB region is not used
    assert tlb.deepest_walk(GiB + 4 * MiB) == l1


def test_deepest_walk_none_when_nothing_covers():
    tlb = Tlb()
    tlb.insert_walk(WalkEntry(GiB, 1, 0x91))
    assert tlb.deepest_walk(0x1000) is None


def test_references_table():
    tlb = Tlb()
    w = WalkEntry(GiB, 1, 0x91)
    tlb.insert_walk(w)
    assert tlb.references_table(0x91) == w
    assert tlb.references_table(0x92) is None
    tlb.invalidate_ipa(GiB, None)
    assert tlb.references_table(0x91) is None
