"""VM configurations and memslot/host layouts (DESIGN §5).

Layouts are small (a few MiB) so steps stay cheap, but always contain what the
bugs need: at least one 2 MiB-aligned window inside a memslot (blocks are
possible), optionally a gfn/hva misalignment (blocks must be refused, rules
§3.3), THP-backed or not, and optionally a small read-only slot.
"""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from conformance.protocol import Capabilities, Memslot, VmConfig

PAGE = 1 << 12
MIB2 = 2 << 20
#: Where a program starts in the VM's life (see :class:`Layout`), and what
#: ``boot`` plays through the candidate to get there.
STARTS = ("cold", "running", "migrating", "migrated")
START_STEPS = {
    "cold": (),
    "running": ("vCPU0 read 8 pages of every 2 MiB window of slot 0 (logging off)",
                "then logging on where the layout has it"),
    "migrating": ("vCPU0 read 8 pages of every 2 MiB window of slot 0 (logging off)",
                  "slot 0 logging on", "vCPU0 wrote the same pages"),
    "migrated": ("vCPU0 read 8 pages of every 2 MiB window of slot 0 (logging off)",
                 "slot 0 logging on", "vCPU0 wrote the same pages", "slot 0 logging off"),
}
#: What a ``caches_on`` warm start adds after its first reads.
CACHES_ON_STEP = "every vCPU turned its MMU and caches on"


@attrs.frozen
class Vma:
    start: int
    end: int
    thp: bool


@attrs.frozen
class Layout:
    """Memslots and the VMAs behind them, and where in the VM's life the
    program starts (``start``, one of :data:`STARTS`):

    ``cold``       nothing mapped; the slots have their logging flags from birth.
    ``running``    vCPU0 has read 8 pages spread over each 2 MiB window of
                   slot 0 with logging off (blocks where allowed); then logging
                   was turned on for the slots that have it.
    ``migrating``  as ``running`` with slot 0 logging, then vCPU0 wrote 8 pages
                   per window (blocks split, rules §4.3).
    ``migrated``   as ``migrating``, then logging was turned off again: 4 KiB
                   tables are left where blocks may come back (§4.6).

    In a warm start with ``caches_on`` (three in four), every vCPU turned its
    MMU and caches on (SCTLR_EL1.{M,C}, trapped by TVM: KVM flushes the VM and
    stops trapping, rules §6.3) right after the first reads, as a guest
    kernel does once its boot code has run with the MMU off. Without it the guest stays in its
    MMU-off boot phase, which is where the cache bugs of §6.1 show.

    ``memslots`` are the slots as they are when the program starts."""

    memslots: tuple[Memslot, ...]
    vmas: tuple[Vma, ...]
    start: str = "cold"
    caches_on: bool = False

    def describe_start(self) -> str:
        """What boot played to reach ``start`` ('' for a cold start)."""
        if self.start == "cold":
            return ""
        steps = list(START_STEPS[self.start])
        if self.caches_on:
            steps.insert(1, CACHES_ON_STEP)
        return f"starts {self.start}: {', '.join(steps)}"

    def describe(self) -> str:
        """Memslots (with their RO and dirty-logging flags), VMAs, in hex, and
        the warm start if any: the layout line of notes and reports."""
        parts = []
        for s in self.memslots:
            flags = [f for f, on in (("RO", s.readonly), ("dirty-logging", s.log_dirty_pages))
                     if on]
            parts.append(f"slot{s.id} gfn {s.base_gfn:#x}+{s.npages:#x} @hva "
                         f"{s.userspace_addr:#x}" + (f" [{', '.join(flags)}]" if flags else ""))
        thp = [f"{v.start:#x}-{v.end:#x}{' THP' if v.thp else ''}" for v in self.vmas]
        start = self.describe_start()
        return "; ".join(parts) + "; VMAs " + ", ".join(thp) + (f"; {start}" if start else "")


def configs(caps: Capabilities = Capabilities(),
            min_vcpus: int = 1) -> st.SearchStrategy[VmConfig]:
    """Configurations a candidate with ``caps`` claims to support, with at
    least ``min_vcpus`` vCPUs where it supports that many."""
    most = max(1, min(4, caps.max_vcpus))
    return st.builds(
        VmConfig,
        ipa_bits=st.sampled_from([40, 32, 36, 44, 48]),
        fwb=st.booleans() if caps.fwb else st.just(False),
        hw_af=st.booleans() if caps.hw_af else st.just(False),
        dic=st.booleans() if caps.dic else st.just(False),
        idc=st.booleans(),
        nr_vcpus=st.integers(min(min_vcpus, most), most),
    ).map(_architectural)


def _architectural(config: VmConfig) -> VmConfig:
    """FEAT_S2FWB requires CLIDR_EL1.{LoUU,LoUIS} == 0: no data cache needs
    cleaning for instruction-fetch coherency, i.e. it behaves as IDC."""
    return attrs.evolve(config, idc=True) if config.fwb else config


#: Where slot 0 starts: at 1 GiB, or (``cross_1g``) 2 MiB below it.
BASE_GFN, BELOW_1G_GFN = 0x40000, 0x3fe00


@st.composite
def layouts(draw, cross_1g: bool = False) -> Layout:
    """Slot 0: RAM with one or two 2 MiB windows, hva congruent to the IPA
    modulo 2 MiB or off by a page; optional slot 1: a small (maybe read-only)
    slot elsewhere in the IPA space, backed by a separate VMA.

    With ``cross_1g`` (the parallel machine), slot 0 of 640 or 1024 pages
    may start 2 MiB below 1 GiB, so that it crosses a 1 GiB IPA boundary:
    the boundary between two level-1 entries, and between two chunks of a
    resumable unmap (``stage2_range_addr_end``)."""
    npages = draw(st.sampled_from([1024, 512, 640]))
    base_gfn = BASE_GFN
    if cross_1g and npages > 512 and draw(st.sampled_from((False, True, True))):
        base_gfn = BELOW_1G_GFN
    # Blocks need THP backing and gfn/hva congruence: make that the common case
    # (6 in 8), so that splits and collapses happen in many programs.
    misaligned, thp = draw(st.sampled_from(
        [(False, True), (False, True), (True, True), (False, False)] + [(False, True)] * 4))
    hva0 = 0x4000_0000 + (PAGE if misaligned else 0)
    vma0 = Vma(0x4000_0000, 0x4000_0000 + (npages << 12) + MIB2, thp)
    # Starting with dirty logging on puts 4K pages in a THP window at once, so
    # disabling it and faulting again collapses them (rules §4.6).
    logging = draw(st.sampled_from([True, False, True]))
    slots = [Memslot(0, base_gfn, npages, hva0, log_dirty_pages=logging)]
    vmas = [vma0]
    if draw(st.sampled_from([False, False, True])):
        readonly = draw(st.booleans())
        slots.append(Memslot(1, 0x80000, 16, 0x8000_0000, readonly=readonly))
        vmas.append(Vma(0x8000_0000, 0x8000_0000 + (16 << 12), False))
    # Most bugs need a VM that has run for a while: two programs in three
    # start with slot 0 touched; one in three just after a migration (4 KiB
    # tables in block-sized windows, where the next fault collapses them).
    start = draw(st.sampled_from(STARTS + ("cold", "migrated")))
    if start in ("migrating", "migrated"):
        slots[0] = attrs.evolve(slots[0], log_dirty_pages=start == "migrating")
    # A running guest has its caches on: three warm starts in four (shrinks
    # to off; cold starts and the other warm starts keep the MMU-off phase).
    caches_on = start != "cold" and draw(st.sampled_from((False, True, True, True)))
    return Layout(tuple(slots), tuple(vmas), start, caches_on)


def interesting_gfns(layout: Layout) -> list[int]:
    """gfns biased to slot edges and 2 MiB block boundaries, plus a gfn with
    no memslot (an MMIO hole). Order matters: index 0 is the simplest."""
    out: list[int] = []
    for s in layout.memslots:
        first_block = -(-s.base_gfn // 512) * 512
        cands = [s.base_gfn, s.base_gfn + 1, first_block + 511, first_block + 512,
                 s.end_gfn - 1, first_block + 5, s.base_gfn + s.npages // 2,
                 first_block + 256]
        out.extend(g for g in cands if s.contains_gfn(g))
    out.append(layout.memslots[0].end_gfn + 0x100)  # no memslot
    return list(dict.fromkeys(out))
