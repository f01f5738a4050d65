"""Tests for model.geometry against rules §1.1."""

import pytest
from hypothesis import given, strategies as st

from model.geometry import (
    LEVEL_SHIFT,
    MIN_BLOCK_LEVEL,
    PAGE_SIZE,
    PTRS_PER_TABLE,
    Geometry,
    align_down,
    granule,
    index,
    level_for_size,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# (ipa_bits, levels, start_level, pgd_pages, start-level entries used)
# -- the table in rules §1.1 (non-LPA2 rows).
GEOMETRY_TABLE = [
    (32, 2, 2, 4, 4 * 512),
    (36, 3, 1, 1, 64),
    (40, 3, 1, 2, 1024),
    (42, 3, 1, 8, 8 * 512),
    (43, 3, 1, 16, 16 * 512),
    (44, 4, 0, 1, 32),
    (48, 4, 0, 1, 512),
]


def test_constants():
    assert PAGE_SIZE == 4096
    assert PTRS_PER_TABLE == 512
    assert LEVEL_SHIFT == {0: 39, 1: 30, 2: 21, 3: 12}
    assert MIN_BLOCK_LEVEL == 1


@pytest.mark.parametrize("level,size", [(0, 512 * GiB), (1, GiB), (2, 2 * MiB), (3, 4 * KiB)])
def test_granule(level, size):
    assert granule(level) == size


@pytest.mark.parametrize("level", [-1, 4])
def test_granule_and_index_reject_bad_level(level):
    with pytest.raises(ValueError):
        granule(level)
    with pytest.raises(ValueError):
        index(0, level)


def test_index_picks_nine_bits_per_level():
    ipa = (5 << 39) | (7 << 30) | (511 << 21) | (3 << 12) | 0xABC
    assert [index(ipa, lvl) for lvl in range(4)] == [5, 7, 511, 3]
    assert index((1 << 48) | (1 << 39), 0) == 1  # bits above 47 ignored


def test_align_down():
    assert align_down(0x80234567, 2 * MiB) == 0x80200000
    assert align_down(0x1000, PAGE_SIZE) == 0x1000
    assert align_down(0xFFF, PAGE_SIZE) == 0
    with pytest.raises(ValueError):
        align_down(0x1000, 3000)


@pytest.mark.parametrize("size,level", [(4 * KiB, 3), (2 * MiB, 2), (GiB, 1)])
def test_level_for_size(size, level):
    assert level_for_size(size) == level


@pytest.mark.parametrize("size", [0, 8 * KiB, 4 * MiB, 512 * GiB, 64 * KiB])
def test_level_for_size_rejects(size):
    with pytest.raises(ValueError):
        level_for_size(size)


@pytest.mark.parametrize("bits,levels,start,pages,entries", GEOMETRY_TABLE)
def test_geometry_table(bits, levels, start, pages, entries):
    g = Geometry(bits)
    assert (g.levels, g.start_level, g.pgd_pages) == (levels, start, pages)
    assert g.pgd_entries == entries
    assert g.ipa_limit == 1 << bits


@pytest.mark.parametrize("bits", [31, 49, 0, 52])
def test_geometry_rejects_out_of_range_ipa_bits(bits):
    with pytest.raises(ValueError, match="ipa_bits"):
        Geometry(bits)


def test_geometry_is_frozen():
    g = Geometry(40)
    with pytest.raises(AttributeError):
        g.ipa_bits = 41


@pytest.mark.parametrize("bits,levels,start,pages,entries", GEOMETRY_TABLE)
def test_pgd_slot_first_and_last_ipa_of_each_page(bits, levels, start, pages, entries):
    g = Geometry(bits)
    per_page = g.ipa_limit // pages
    last_index = min(entries, PTRS_PER_TABLE) - 1
    for page in range(pages):
        first = page * per_page
        assert g.pgd_slot(first) == (page, 0)
        assert g.pgd_slot(first + per_page - 1) == (page, last_index)


@pytest.mark.parametrize("bits", [32, 40, 48])
def test_pgd_slot_rejects_ipa_at_limit(bits):
    g = Geometry(bits)
    g.pgd_slot(g.ipa_limit - 1)
    with pytest.raises(ValueError):
        g.pgd_slot(g.ipa_limit)
    with pytest.raises(ValueError):
        g.pgd_slot(-1)


@st.composite
def geometry_and_ipa(draw):
    g = Geometry(draw(st.integers(32, 48)))
    return g, draw(st.integers(0, g.ipa_limit - 1))


@given(geometry_and_ipa())
def test_slot_and_indices_reconstruct_page_aligned_ipa(case):
    g, ipa = case
    page, idx = g.pgd_slot(ipa)
    assert 0 <= page < g.pgd_pages and 0 <= idx < PTRS_PER_TABLE
    rebuilt = page * PTRS_PER_TABLE * granule(g.start_level) + idx * granule(g.start_level)
    for level in range(g.start_level + 1, 4):
        rebuilt += index(ipa, level) * granule(level)
    assert rebuilt == align_down(ipa, PAGE_SIZE)
