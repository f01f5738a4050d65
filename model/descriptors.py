"""Stage-2 descriptor encoding as KVM uses it (rules §1.2-§1.4).

Bit exact for the non-LPA2, 4 KiB-granule format. `Leaf`, `Table` and
`Invalid` are decoded views; everything else works on raw 64-bit ints.
`decode` ignores bits KVM never writes (11, 16, 51-53, 59-63), so
encode(decode(pte)) == pte only for KVM-produced descriptors.
"""

from __future__ import annotations

import enum

import attrs
from attrs import validators as v

from model.geometry import MIN_BLOCK_LEVEL, PAGE_SIZE, granule


def _genmask(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


PTE_VALID = 1 << 0
PTE_TYPE = 1 << 1  # 1 = table (L0-L2) / page (L3); 0 = block (L1-L2)
MEMATTR_SHIFT = 2
MEMATTR_MASK = 0xF << MEMATTR_SHIFT
S2AP_R = 1 << 6
S2AP_W = 1 << 7
SH_SHIFT = 8
SH_MASK = 0x3 << SH_SHIFT
SH_IS = 3
AF = 1 << 10
ADDR_MASK = _genmask(47, 12)
XN = 1 << 54  # KVM only sets XN[1] (XN = 0b10)
SW_SHIFT = 55
SW_MASK = 0xF << SW_SHIFT
INVALID_PTE_LOCKED = 1 << 10  # bit 0 clear
ATTR_LO_MASK = _genmask(11, 2)
ATTR_HI_MASK = _genmask(63, 50)
S2_PERMS = S2AP_R | S2AP_W | XN
PTE_MASK = _genmask(63, 0)


class MemType(enum.Enum):
    """Stage-2 memory types KVM maps (rules §1.3)."""

    NORMAL = "Normal"
    NORMAL_NC = "Normal-NC"
    DEVICE = "Device"


def memattr(memtype: MemType, fwb: bool) -> int:
    """MemAttr[3:0] (PAGE_S2_MEMATTR): Normal 0xF, or 0x6 with FWB;
    Normal-NC 0x5; Device-nGnRE 0x1 in both modes (rules §1.3)."""
    if memtype is MemType.NORMAL:
        return 0x6 if fwb else 0xF
    return {MemType.NORMAL_NC: 0x5, MemType.DEVICE: 0x1}[memtype]


def memtype_of(value: int, fwb: bool) -> MemType:
    """Inverse of `memattr`; ValueError for encodings KVM never writes in
    this FWB mode (rules §1.3)."""
    for memtype in MemType:
        if memattr(memtype, fwb) == value:
            return memtype
    raise ValueError(f"MemAttr {value:#x} is not a KVM encoding (fwb={fwb})")


class Prot(enum.Flag):
    """Subset of enum kvm_pgtable_prot, KVM's bit values (rules §1.3)."""

    X = 1 << 0
    W = 1 << 1
    R = 1 << 2
    DEVICE = 1 << 3
    NORMAL_NC = 1 << 4


def _int(lo: int, hi: int) -> list:
    """Validators: an int in [lo, hi] (ValueError when out of range)."""
    return [v.instance_of(int), v.ge(lo), v.le(hi)]


_BOOL = v.instance_of(bool)


@attrs.frozen
class Leaf:
    """A valid block (L1/L2) or page (L3) descriptor (rules §1.2).
    L0 cannot hold a block with the 4K granule (rules §1.1)."""

    oa: int = attrs.field(validator=_int(0, ADDR_MASK))
    level: int = attrs.field(validator=_int(MIN_BLOCK_LEVEL, 3))
    read: bool = attrs.field(validator=_BOOL)
    write: bool = attrs.field(validator=_BOOL)
    exec: bool = attrs.field(validator=_BOOL)
    memattr: int = attrs.field(validator=_int(0, 0xF))
    af: bool = attrs.field(default=True, validator=_BOOL)
    sh: int = attrs.field(default=SH_IS, validator=_int(0, 3))
    sw: int = attrs.field(default=0, validator=_int(0, 0xF))

    def __attrs_post_init__(self) -> None:
        """OA must be aligned to the leaf's granule (rules §2.5)."""
        if self.oa % self.size:
            raise ValueError(f"OA {self.oa:#x} not aligned to L{self.level} granule")

    @property
    def size(self) -> int:
        """Bytes mapped: 1 GiB at L1, 2 MiB at L2, 4 KiB at L3 (§1.1)."""
        return granule(self.level)

    def encode(self) -> int:
        """Raw descriptor; type bit 1 for L3 pages, 0 for blocks (§1.2)."""
        pte = PTE_VALID | self.oa | (self.memattr << MEMATTR_SHIFT)
        pte |= (self.sh << SH_SHIFT) | (self.sw << SW_SHIFT)
        pte |= PTE_TYPE if self.level == 3 else 0
        pte |= (S2AP_R if self.read else 0) | (S2AP_W if self.write else 0)
        pte |= (0 if self.exec else XN) | (AF if self.af else 0)
        return pte

    def with_perms(self, read=None, write=None, exec=None) -> Leaf:
        """Copy with the given permissions changed (None keeps the old one)."""
        new = {"read": read, "write": write, "exec": exec}
        return attrs.evolve(self, **{k: b for k, b in new.items() if b is not None})


@attrs.frozen
class Table:
    """A valid table descriptor at L0-L2: only the next-level address, no
    hierarchical attributes at stage 2 (rules §1.1, §1.2)."""

    next_pa: int = attrs.field(validator=_int(0, ADDR_MASK))

    def __attrs_post_init__(self) -> None:
        if self.next_pa % PAGE_SIZE:
            raise ValueError(f"table address {self.next_pa:#x} not 4 KiB aligned")

    def encode(self) -> int:
        return self.next_pa | PTE_TYPE | PTE_VALID


@attrs.frozen
class Invalid:
    """Bit 0 clear: empty (0), LOCKED (bit 10 only) or annotation (§1.4)."""

    raw: int = attrs.field(validator=_int(0, PTE_MASK))

    def __attrs_post_init__(self) -> None:
        if self.raw & PTE_VALID:
            raise ValueError(f"invalid descriptor {self.raw:#x} has bit 0 set")

    @property
    def locked(self) -> bool:
        return self.raw == INVALID_PTE_LOCKED

    @property
    def empty(self) -> bool:
        return self.raw == 0

    def encode(self) -> int:
        return self.raw


def decode(pte: int, level: int) -> Leaf | Table | Invalid:
    """Decode `pte` read at `level` (rules §1.2): bit 0 clear -> Invalid;
    type 1 below L3 -> Table; type 1 at L3 -> page; type 0 at L1/L2 -> block.
    Type 0 at L3 is reserved and L0 cannot hold a block (both ValueError).
    XN counts as set iff bit 54 is set."""
    if not 0 <= pte <= PTE_MASK or level not in (0, 1, 2, 3):
        raise ValueError(f"cannot decode {pte:#x} at level {level!r}")
    if not pte & PTE_VALID:
        return Invalid(pte)
    if level < 3 and pte & PTE_TYPE:
        return Table(pte & ADDR_MASK)
    if level == 3 and not pte & PTE_TYPE:
        raise ValueError("reserved encoding at L3")
    if level == 0:
        raise ValueError("L0 cannot hold a block (4K granule)")
    return Leaf(
        oa=pte & ADDR_MASK, level=level,
        read=bool(pte & S2AP_R), write=bool(pte & S2AP_W), exec=not pte & XN,
        memattr=(pte & MEMATTR_MASK) >> MEMATTR_SHIFT, af=bool(pte & AF),
        sh=(pte & SH_MASK) >> SH_SHIFT, sw=(pte & SW_MASK) >> SW_SHIFT,
    )


def _prot_memtype(prot: Prot) -> MemType:
    """stage2_set_prot_attr: DEVICE+NORMAL_NC, DEVICE+X and NORMAL_NC+X are
    all -EINVAL (ValueError here) (rules §1.3)."""
    if Prot.DEVICE in prot and Prot.NORMAL_NC in prot:
        raise ValueError("DEVICE and NORMAL_NC are mutually exclusive")
    if Prot.X in prot and prot & (Prot.DEVICE | Prot.NORMAL_NC):
        raise ValueError("Device / Normal-NC mappings cannot be executable")
    if Prot.DEVICE in prot:
        return MemType.DEVICE
    return MemType.NORMAL_NC if Prot.NORMAL_NC in prot else MemType.NORMAL


def make_leaf(pa: int, level: int, prot: Prot, fwb: bool, sw: int = 0) -> int:
    """Leaf as KVM's map builds it: MemAttr from the type, XN unless X,
    S2AP_R/W from R/W, SH = IS, AF = 1, SW bits copied (rules §1.3)."""
    return Leaf(oa=pa, level=level, read=Prot.R in prot, write=Prot.W in prot,
                exec=Prot.X in prot, memattr=memattr(_prot_memtype(prot), fwb),
                sw=sw).encode()


def pte_prot(pte: int, fwb: bool) -> Prot:
    """kvm_pgtable_stage2_pte_prot minus SW bits: empty for invalid PTEs; else
    R/W from S2AP, X iff XN clear, DEVICE/NORMAL_NC from MemAttr (ValueError
    if MemAttr is not a KVM encoding) (rules §1.3)."""
    if not is_valid(pte):
        return Prot(0)
    flags = [(Prot.R, pte & S2AP_R), (Prot.W, pte & S2AP_W), (Prot.X, not pte & XN)]
    memtype = memtype_of((pte & MEMATTR_MASK) >> MEMATTR_SHIFT, fwb)
    flags += [(Prot.DEVICE, memtype is MemType.DEVICE),
              (Prot.NORMAL_NC, memtype is MemType.NORMAL_NC)]
    prot = Prot(0)
    for flag, on in flags:
        prot |= flag if on else Prot(0)
    return prot


def is_valid(pte: int) -> bool:
    """Bit 0 set (rules §1.2)."""
    return bool(pte & PTE_VALID)


def is_table(pte: int, level: int) -> bool:
    """Valid, type bit set and level < 3 (rules §2.2 step 5)."""
    return is_valid(pte) and bool(pte & PTE_TYPE) and level < 3


def is_leaf(pte: int, level: int) -> bool:
    """Valid page at L3 or valid block at L1/L2; the reserved L3 encoding and
    an L0 "block" are not leaves (rules §1.1, §1.2)."""
    if not is_valid(pte):
        return False
    return bool(pte & PTE_TYPE) if level == 3 else level in (1, 2) and not pte & PTE_TYPE


def is_locked(pte: int) -> bool:
    """KVM_INVALID_PTE_LOCKED: exactly bit 10 with bit 0 clear (§1.4)."""
    return pte == INVALID_PTE_LOCKED


def pte_pa(pte: int) -> int:
    """Output / next-table address, bits 47:12 (rules §1.2)."""
    return pte & ADDR_MASK


def is_counted(pte: int) -> bool:
    """stage2_pte_is_counted: every non-zero entry holds a reference on its
    table page (rules §1.4, §2.3)."""
    return pte != 0


def is_cacheable(pte: int, fwb: bool) -> bool:
    """stage2_pte_cacheable: valid and MemAttr is the Normal encoding for this
    FWB mode; Normal-NC and Device are not cacheable (rules §1.3)."""
    value = (pte & MEMATTR_MASK) >> MEMATTR_SHIFT
    return is_valid(pte) and value == memattr(MemType.NORMAL, fwb)


def perm_only_change(old: int, new: int) -> bool:
    """Both valid and differing only in S2AP_R/S2AP_W/XN, or identical
    (!stage2_pte_needs_update; rules §2.5 try_leaf step 3)."""
    return is_valid(old) and is_valid(new) and not (old ^ new) & ~S2_PERMS


_MEMTYPE_NAMES = {0xF: "Normal", 0x6: "Normal", 0x5: "Normal-NC", 0x1: "Device"}


def describe(pte: int, level: int) -> str:
    """Short text for reports, e.g. "L2 block PA 0x80200000 RW- AF Normal",
    "table -> PA 0x5000", "invalid", "LOCKED". Never raises."""
    if is_locked(pte):
        return "LOCKED"
    try:
        entry = decode(pte, level)
    except ValueError as err:
        return f"L{level} bad descriptor {pte:#x}: {err}"
    if isinstance(entry, Invalid):
        return "invalid" if entry.empty else f"invalid ({pte:#x})"
    if isinstance(entry, Table):
        return f"table -> PA {entry.next_pa:#x}"
    bits = (("R", entry.read), ("W", entry.write), ("X", entry.exec))
    perms = "".join(c if on else "-" for c, on in bits)
    kind = "page" if level == 3 else "block"
    mem = _MEMTYPE_NAMES.get(entry.memattr, f"MemAttr={entry.memattr:#x}")
    text = f"L{level} {kind} PA {entry.oa:#x} {perms} {'AF' if entry.af else 'noAF'} {mem}"
    return text + (f" SW={entry.sw:#x}" if entry.sw else "")
