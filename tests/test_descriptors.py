"""Tests for model.descriptors against rules §1.2-§1.4."""

import pytest
from hypothesis import given, strategies as st

from model.descriptors import (
    ADDR_MASK,
    AF,
    ATTR_HI_MASK,
    ATTR_LO_MASK,
    INVALID_PTE_LOCKED,
    MEMATTR_MASK,
    MEMATTR_SHIFT,
    PTE_TYPE,
    PTE_VALID,
    S2_PERMS,
    S2AP_R,
    S2AP_W,
    SH_IS,
    SH_MASK,
    SH_SHIFT,
    SW_MASK,
    SW_SHIFT,
    XN,
    Invalid,
    Leaf,
    MemType,
    Prot,
    Table,
    decode,
    describe,
    is_cacheable,
    is_counted,
    is_leaf,
    is_locked,
    is_table,
    is_valid,
    make_leaf,
    memattr,
    memtype_of,
    perm_only_change,
    pte_prot,
)
from model.geometry import granule

MiB = 1 << 20
RW, RX = Prot.R | Prot.W, Prot.R | Prot.X
OA_LIMIT = 1 << 48


# ---------------------------------------------------------------- strategies

@st.composite
def leaves(draw, levels=(1, 2, 3)):
    level = draw(st.sampled_from(levels))
    oa = draw(st.integers(0, OA_LIMIT // granule(level) - 1)) * granule(level)
    return Leaf(
        oa=oa, level=level,
        read=draw(st.booleans()), write=draw(st.booleans()), exec=draw(st.booleans()),
        memattr=draw(st.integers(0, 15)), af=draw(st.booleans()),
        sh=draw(st.integers(0, 3)), sw=draw(st.integers(0, 15)),
    )


tables = st.builds(Table, st.integers(0, OA_LIMIT // 4096 - 1).map(lambda n: n * 4096))


@st.composite
def valid_prots(draw):
    """Prot values stage2_set_prot_attr accepts (rules §1.3)."""
    prot = Prot(0)
    for flag in (Prot.R, Prot.W):
        prot |= flag if draw(st.booleans()) else Prot(0)
    kind = draw(st.sampled_from([Prot(0), Prot.X, Prot.DEVICE, Prot.NORMAL_NC]))
    return prot | kind


# ---------------------------------------------------------- bit positions

def test_constant_bit_positions():
    assert (PTE_VALID, PTE_TYPE) == (1 << 0, 1 << 1)
    assert MEMATTR_MASK == 0b111100 and MEMATTR_SHIFT == 2
    assert (S2AP_R, S2AP_W) == (1 << 6, 1 << 7)
    assert SH_MASK == 0x300 and SH_SHIFT == 8 and SH_IS == 3
    assert AF == 1 << 10 and INVALID_PTE_LOCKED == 1 << 10
    assert ADDR_MASK == 0x0000_FFFF_FFFF_F000
    assert XN == 1 << 54
    assert SW_MASK == 0x0780_0000_0000_0000 and SW_SHIFT == 55
    assert ATTR_LO_MASK == 0xFFC
    assert ATTR_HI_MASK == 0xFFFC_0000_0000_0000
    assert S2_PERMS == (1 << 6) | (1 << 7) | (1 << 54)


def test_prot_uses_kvm_bit_values():
    assert [p.value for p in (Prot.X, Prot.W, Prot.R, Prot.DEVICE, Prot.NORMAL_NC)] == [
        1, 2, 4, 8, 16]


def test_l2_block_exact_encoding():
    pte = make_leaf(0x8020_0000, 2, RW, fwb=False)
    # VALID | MemAttr 0xF | S2AP RW | SH IS | AF | OA | XN ; type bit 1 clear
    assert pte == 0x0040_0000_8020_07FD
    assert pte & PTE_TYPE == 0


def test_l3_page_exact_encoding():
    pte = make_leaf(0x81000, 3, RX, fwb=True)
    # VALID | TYPE | MemAttr 0x6 | S2AP R | SH IS | AF | OA ; XN clear
    assert pte == 0x8175B
    assert pte & PTE_TYPE


def test_individual_field_bits():
    base = Leaf(oa=0, level=3, read=False, write=False, exec=True, memattr=0, af=False,
                sh=0)
    assert base.encode() == PTE_VALID | PTE_TYPE
    assert base.with_perms(write=True).encode() == 0b11 | (1 << 7)
    assert base.with_perms(read=True).encode() == 0b11 | (1 << 6)
    assert base.with_perms(exec=False).encode() == 0b11 | (1 << 54)
    assert Leaf(oa=0, level=3, read=False, write=False, exec=True, memattr=0,
                af=True, sh=0).encode() == 0b11 | (1 << 10)
    assert Leaf(oa=0, level=3, read=False, write=False, exec=True, memattr=0,
                af=False, sh=0, sw=0xF).encode() == 0b11 | (0xF << 55)


def test_table_encoding():
    assert Table(0x5000).encode() == 0x5003


# ---------------------------------------------------------- round trips

@given(leaves())
def test_leaf_round_trip(leaf):
    assert decode(leaf.encode(), leaf.level) == leaf


@given(leaves())
def test_leaf_fields_land_in_their_bits(leaf):
    pte = leaf.encode()
    assert pte & ADDR_MASK == leaf.oa
    assert (pte & MEMATTR_MASK) >> MEMATTR_SHIFT == leaf.memattr
    assert (pte & SH_MASK) >> SH_SHIFT == leaf.sh
    assert (pte & SW_MASK) >> SW_SHIFT == leaf.sw
    assert bool(pte & S2AP_R) == leaf.read and bool(pte & S2AP_W) == leaf.write
    assert bool(pte & XN) != leaf.exec and bool(pte & AF) == leaf.af
    assert bool(pte & PTE_TYPE) == (leaf.level == 3)
    known = PTE_VALID | PTE_TYPE | ATTR_LO_MASK | ADDR_MASK | XN | SW_MASK
    assert pte & ~known == 0 and not pte & (1 << 11)


@given(tables, st.sampled_from([0, 1, 2]))
def test_table_round_trip(table, level):
    assert decode(table.encode(), level) == table
    assert is_table(table.encode(), level) and not is_leaf(table.encode(), level)


def test_table_bits_at_l3_are_a_page():
    assert isinstance(decode(Table(0x5000).encode(), 3), Leaf)
    assert not is_table(Table(0x5000).encode(), 3)


def test_xn_is_bit_54_only():
    page = make_leaf(0x1000, 3, Prot.R, fwb=False)
    assert decode(page, 3).exec is False
    assert decode(page & ~XN, 3).exec is True
    assert decode((page & ~XN) | (1 << 53), 3).exec is True


# ---------------------------------------------------------- invalid / decode errors

def test_decode_empty_and_locked():
    empty, locked = decode(0, 2), decode(INVALID_PTE_LOCKED, 3)
    assert empty == Invalid(0) and empty.empty and not empty.locked
    assert locked.locked and not locked.empty
    assert is_locked(INVALID_PTE_LOCKED) and not is_locked(0)
    assert not is_locked(INVALID_PTE_LOCKED | PTE_VALID)
    assert not is_locked(INVALID_PTE_LOCKED | (1 << 2))  # exactly bit 10
    assert not decode(INVALID_PTE_LOCKED | (1 << 2), 3).locked


def test_owner_annotation_is_invalid_but_counted():
    annotation = 1 << 2  # owner id 1 in bits [9:2]
    entry = decode(annotation, 3)
    assert isinstance(entry, Invalid) and not entry.empty and not entry.locked
    assert is_counted(annotation) and is_counted(INVALID_PTE_LOCKED)
    assert not is_counted(0)


def test_invalid_rejects_valid_bit():
    with pytest.raises(ValueError):
        Invalid(0x3)


def test_decode_reserved_l3_encoding():
    with pytest.raises(ValueError, match="reserved encoding at L3"):
        decode(0x8000_0001, 3)


def test_decode_l0_block_rejected():
    with pytest.raises(ValueError, match="L0"):
        decode(PTE_VALID, 0)
    assert decode(0x5003, 0) == Table(0x5000)


@pytest.mark.parametrize("level", [-1, 4])
def test_decode_bad_level(level):
    with pytest.raises(ValueError):
        decode(0, level)


# ---------------------------------------------------------- validation

@pytest.mark.parametrize("level,oa", [(1, 2 * MiB), (2, 0x1000), (3, 0x800), (2, 1 << 48)])
def test_misaligned_or_out_of_range_oa_rejected(level, oa):
    with pytest.raises(ValueError):
        Leaf(oa=oa, level=level, read=True, write=False, exec=False, memattr=0xF)


@pytest.mark.parametrize("field,value", [
    ("level", 0), ("level", 4), ("memattr", 16), ("memattr", -1),
    ("sh", 4), ("sw", 16),
])
def test_leaf_field_ranges(field, value):
    kwargs = dict(oa=0, level=3, read=True, write=False, exec=False, memattr=0xF)
    kwargs[field] = value
    with pytest.raises(ValueError):
        Leaf(**kwargs)


def test_leaf_aligned_block_accepted():
    assert Leaf(oa=1 << 30, level=1, read=True, write=True, exec=False, memattr=0xF).size == 1 << 30


@pytest.mark.parametrize("pa", [0x800, 1 << 48, -4096])
def test_table_address_rejected(pa):
    with pytest.raises(ValueError):
        Table(pa)


# ---------------------------------------------------------- make_leaf / prot

@pytest.mark.parametrize("prot", [
    Prot.DEVICE | Prot.NORMAL_NC,
    Prot.R | Prot.DEVICE | Prot.X,
    Prot.R | Prot.NORMAL_NC | Prot.X,
])
def test_make_leaf_rejects_invalid_prot(prot):
    with pytest.raises(ValueError):
        make_leaf(0x1000, 3, prot, fwb=False)


def test_make_leaf_rejects_misaligned_block_and_l0():
    with pytest.raises(ValueError):
        make_leaf(0x8020_1000, 2, RW, fwb=False)
    with pytest.raises(ValueError):
        make_leaf(0, 0, RW, fwb=False)


@pytest.mark.parametrize("extra,fwb,expected", [
    (Prot(0), False, 0xF), (Prot(0), True, 0x6),
    (Prot.NORMAL_NC, False, 0x5), (Prot.NORMAL_NC, True, 0x5),
    (Prot.DEVICE, False, 0x1), (Prot.DEVICE, True, 0x1),
])
def test_make_leaf_memattr(extra, fwb, expected):
    pte = make_leaf(0x20_0000, 2, Prot.R | extra, fwb)
    assert (pte & MEMATTR_MASK) >> MEMATTR_SHIFT == expected


@given(valid_prots(), st.sampled_from([1, 2, 3]), st.booleans(), st.integers(0, 15))
def test_make_leaf_fields(prot, level, fwb, sw):
    pte = make_leaf(3 * granule(level), level, prot, fwb, sw=sw)
    leaf = decode(pte, level)
    assert (leaf.read, leaf.write, leaf.exec) == (Prot.R in prot, Prot.W in prot, Prot.X in prot)
    assert leaf.af and leaf.sh == SH_IS and leaf.sw == sw and leaf.oa == 3 * granule(level)


@given(valid_prots(), st.booleans())
def test_pte_prot_round_trip(prot, fwb):
    assert pte_prot(make_leaf(0x4000, 3, prot, fwb), fwb) == prot


def test_pte_prot_invalid_and_unknown_memattr():
    assert pte_prot(0, fwb=False) == Prot(0)
    assert pte_prot(INVALID_PTE_LOCKED, fwb=True) == Prot(0)
    with pytest.raises(ValueError):
        pte_prot(make_leaf(0x4000, 3, Prot.R, fwb=True), fwb=False)  # 0x6 w/o FWB


@pytest.mark.parametrize("memtype", list(MemType))
@pytest.mark.parametrize("fwb", [False, True])
def test_memtype_of_inverts_memattr(memtype, fwb):
    assert memtype_of(memattr(memtype, fwb), fwb) is memtype


@pytest.mark.parametrize("value,fwb", [(0x6, False), (0xF, True), (0x0, False), (0x4, True)])
def test_memtype_of_rejects_foreign_encodings(value, fwb):
    with pytest.raises(ValueError):
        memtype_of(value, fwb)


# ---------------------------------------------------------- predicates

@pytest.mark.parametrize("extra,fwb,cacheable", [
    (Prot(0), False, True), (Prot(0), True, True),
    (Prot.NORMAL_NC, False, False), (Prot.NORMAL_NC, True, False),
    (Prot.DEVICE, False, False), (Prot.DEVICE, True, False),
])
def test_is_cacheable(extra, fwb, cacheable):
    assert is_cacheable(make_leaf(0x1000, 3, Prot.R | extra, fwb), fwb) is cacheable


def test_is_cacheable_depends_on_fwb_mode_and_validity():
    assert not is_cacheable(make_leaf(0x1000, 3, Prot.R, fwb=False), fwb=True)
    assert not is_cacheable(make_leaf(0x1000, 3, Prot.R, fwb=True), fwb=False)
    assert not is_cacheable(0xF << MEMATTR_SHIFT, fwb=False)  # bit 0 clear


def test_is_leaf_and_is_table_by_level():
    block, page = make_leaf(0x20_0000, 2, RW, False), make_leaf(0x1000, 3, RW, False)
    assert is_leaf(block, 2) and is_leaf(block, 1) and not is_table(block, 2)
    assert is_leaf(page, 3) and not is_leaf(block, 3) and not is_leaf(block, 0)
    assert is_table(page, 2) and not is_leaf(page, 2)
    assert not is_valid(0) and not is_leaf(0, 3) and not is_table(0, 1)
    assert not is_table(INVALID_PTE_LOCKED | PTE_TYPE, 1)


def test_perm_only_change_true_cases():
    old = make_leaf(0x1000, 3, Prot.R, fwb=False)
    assert perm_only_change(old, old)
    assert perm_only_change(old, make_leaf(0x1000, 3, RW, fwb=False))
    assert perm_only_change(old, make_leaf(0x1000, 3, RX, fwb=False))
    assert perm_only_change(make_leaf(0x1000, 3, RW, fwb=False), old)


def test_perm_only_change_false_cases():
    old = make_leaf(0x1000, 3, Prot.R, fwb=False)
    assert not perm_only_change(old, make_leaf(0x2000, 3, Prot.R, fwb=False))
    assert not perm_only_change(old, make_leaf(0x1000, 3, Prot.R, fwb=True))
    assert not perm_only_change(old, make_leaf(0x1000, 3, Prot.R | Prot.DEVICE, fwb=False))
    assert not perm_only_change(old, old & ~AF)
    assert not perm_only_change(old, make_leaf(0x1000, 3, Prot.R, fwb=False, sw=1))
    assert not perm_only_change(0, old) and not perm_only_change(old, 0)
    assert not perm_only_change(old, old & ~PTE_VALID)


@given(leaves(), st.integers(0, 7))
def test_perm_only_change_is_exactly_the_s2_perm_bits(leaf, flips):
    old = leaf.encode()
    mask = sum(bit for i, bit in enumerate((S2AP_R, S2AP_W, XN)) if flips >> i & 1)
    assert perm_only_change(old, old ^ mask)
    assert not perm_only_change(old, old ^ mask ^ (1 << 10))


# ---------------------------------------------------------- describe

def test_describe_examples():
    block = make_leaf(0x8020_0000, 2, RW, False)
    assert describe(block, 2) == "L2 block PA 0x80200000 RW- AF Normal"
    assert describe(make_leaf(0x81000, 3, RX, True), 3) == "L3 page PA 0x81000 R-X AF Normal"
    assert describe(Table(0x5000).encode(), 1) == "table -> PA 0x5000"
    assert describe(0, 3) == "invalid"
    assert describe(INVALID_PTE_LOCKED, 2) == "LOCKED"


@given(leaves())
def test_describe_contains_level_and_perms(leaf):
    text = describe(leaf.encode(), leaf.level)
    perms = "".join(c if on else "-" for c, on in zip("RWX", (leaf.read, leaf.write, leaf.exec)))
    assert text.startswith(f"L{leaf.level} ") and f" {perms} " in text
    assert ("noAF" in text) != leaf.af


def test_describe_memtypes_and_bad_encodings():
    assert describe(make_leaf(0x1000, 3, Prot.R | Prot.DEVICE, False), 3).endswith("Device")
    assert describe(make_leaf(0x1000, 3, Prot.R | Prot.NORMAL_NC, True), 3).endswith("Normal-NC")
    assert "reserved" in describe(0x8000_0001, 3)
    assert describe(4, 3) != "invalid"
