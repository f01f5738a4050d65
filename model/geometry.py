"""Stage-2 translation geometry for the 4 KiB granule (rules §1.1).

Pure arithmetic: level shifts, per-level indices, and the per-VM layout of
the start level (number of levels, start level, concatenated PGD pages).
Levels use KVM's numbering 0..3; LPA2's level -1 is never used for S2.
"""

from __future__ import annotations

import attrs

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PTRS_PER_TABLE = 512
INDEX_BITS = 9
LEVEL_SHIFT = {0: 39, 1: 30, 2: 21, 3: 12}
MIN_BLOCK_LEVEL = 1
MAX_LEVEL = 3

MIN_IPA_BITS = 32
MAX_IPA_BITS = 48
MAX_PGD_PAGES = 16


def _shift(level: int) -> int:
    """Address shift of `level`, extended to level -1 (rules §1.1).

    Only used to size the concatenated start level: the PGD page index of an
    IPA is its bits above shift(start_level - 1).
    """
    return PAGE_SHIFT + INDEX_BITS * (MAX_LEVEL - level)


def _check_level(level: int) -> None:
    if level not in LEVEL_SHIFT:
        raise ValueError(f"level must be 0..3, got {level!r}")


def granule(level: int) -> int:
    """Bytes mapped by one entry at `level`: L0 512 GiB, L1 1 GiB, L2 2 MiB,
    L3 4 KiB (rules §1.1)."""
    _check_level(level)
    return 1 << LEVEL_SHIFT[level]


def index(ipa: int, level: int) -> int:
    """9-bit table index of `ipa` at `level`: L0 = IPA[47:39], L1 = IPA[38:30],
    L2 = IPA[29:21], L3 = IPA[20:12] (rules §1.1)."""
    _check_level(level)
    return (ipa >> LEVEL_SHIFT[level]) & (PTRS_PER_TABLE - 1)


def align_down(addr: int, size: int) -> int:
    """Round `addr` down to a multiple of the power-of-two `size`."""
    if size <= 0 or size & (size - 1):
        raise ValueError(f"alignment must be a power of two, got {size!r}")
    return addr & ~(size - 1)


def level_for_size(size: int) -> int:
    """Level whose leaf maps exactly `size` bytes: 4 KiB -> 3, 2 MiB -> 2,
    1 GiB -> 1. L0 cannot hold a block with the 4K granule (rules §1.1)."""
    for level in range(MIN_BLOCK_LEVEL, MAX_LEVEL + 1):
        if granule(level) == size:
            return level
    raise ValueError(f"no stage-2 leaf maps {size:#x} bytes (4 KiB granule)")


def _check_ipa_bits(_inst: object, _attr: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"ipa_bits must be an int, got {value!r}")
    if not MIN_IPA_BITS <= value <= MAX_IPA_BITS:
        raise ValueError(
            f"ipa_bits must be in [{MIN_IPA_BITS}, {MAX_IPA_BITS}] "
            f"(non-LPA2, 4K granule), got {value}"
        )


@attrs.frozen
class Geometry:
    """Per-VM stage-2 layout for an IPA size of `ipa_bits` (rules §1.1)."""

    ipa_bits: int = attrs.field(validator=_check_ipa_bits)

    @property
    def levels(self) -> int:
        """Number of lookup levels: max(2, floor((ipa_bits - 8) / 9)), i.e.
        KVM's max(2, HW_LEVELS(ipa_bits - 4)) (rules §1.1)."""
        return max(2, (self.ipa_bits - 8) // INDEX_BITS)

    @property
    def start_level(self) -> int:
        """Initial lookup level = 4 - levels (rules §1.1)."""
        return MAX_LEVEL + 1 - self.levels

    @property
    def ipa_limit(self) -> int:
        """First IPA outside the VM's address space: 2^ipa_bits."""
        return 1 << self.ipa_bits

    @property
    def pgd_pages(self) -> int:
        """Concatenated PGD pages: ((2^ipa_bits - 1) >> shift(start - 1)) + 1,
        at most 16 (rules §1.1)."""
        return ((self.ipa_limit - 1) >> _shift(self.start_level - 1)) + 1

    @property
    def pgd_entries(self) -> int:
        """Start-level entries actually addressable across all PGD pages
        (e.g. 64 for 36 bits, 32 for 44 bits; rules §1.1 table)."""
        return self.ipa_limit >> LEVEL_SHIFT[self.start_level]

    def pgd_slot(self, ipa: int) -> tuple[int, int]:
        """(PGD page, index within it) of the start-level entry for `ipa`.

        The page is IPA bits above shift(start_level - 1); the index is the
        usual 9-bit index at the start level (rules §1.1, §2.2 step 3).
        """
        if not 0 <= ipa < self.ipa_limit:
            raise ValueError(
                f"IPA {ipa:#x} outside the {self.ipa_bits}-bit IPA space"
            )
        page = ipa >> _shift(self.start_level - 1)
        return page, index(ipa, self.start_level)
