"""The candidate protocol: the values the harness passes to a candidate and the
methods it calls on it (DESIGN §4).

A candidate is the KVM-side code under test. It is a class registered under the
entry-point group ``stage2_conformance.candidates`` and constructed once per
generated program as ``Candidate(services, config)``. It owns its stage-2 page
tables, which live in platform memory in the architectural format, and it
touches the world *only* through the :class:`~conformance.platform.services.Services`
object it is given.

Everything here is a small frozen value; see ``docs/candidate-protocol.md`` for
a complete minimal candidate.
"""

from __future__ import annotations

import enum

import attrs

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


@attrs.frozen
class VmConfig:
    """What the VM and the (simulated) CPU look like for one generated program.

    ``fwb``: FEAT_S2FWB — stage 2 forces Normal-WB, data-side coherence is
    automatic (rules §6.2). ``hw_af``: VTCR_EL2.HA — the walker sets AF
    itself instead of raising access-flag faults (§1.5 rule 6). ``dic`` /
    ``idc``: CTR_EL0.DIC / IDC — instruction fetches are coherent with data
    (DIC), or the I-cache fills from the data cache (IDC) (§6.2).
    """

    ipa_bits: int = 40
    fwb: bool = False
    hw_af: bool = False
    dic: bool = False
    idc: bool = False
    nr_vcpus: int = 2
    vmid: int = 1


@attrs.frozen
class Memslot:
    """A KVM memslot: guest frames ``[base_gfn, base_gfn + npages)`` backed by
    VMM virtual addresses from ``userspace_addr`` (rules §3.3, §4.1)."""

    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    readonly: bool = False
    log_dirty_pages: bool = False

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def contains_gfn(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.end_gfn

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    @property
    def hva_end(self) -> int:
        return self.userspace_addr + (self.npages << PAGE_SHIFT)

    def contains_hva(self, hva: int) -> bool:
        return self.userspace_addr <= hva < self.hva_end

    def hva_to_gfn(self, hva: int) -> int:
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)

    @property
    def is_logging(self) -> bool:
        """``memslot_is_logging``: RO slots are never logged (rules §4.1)."""
        return self.log_dirty_pages and not self.readonly


class MemslotChange(enum.Enum):
    """``enum kvm_mr_change``."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


class FaultKind(enum.Enum):
    """The xFSC type of a stage-2 abort (rules §1.5)."""

    TRANSLATION = "translation"
    ACCESS_FLAG = "access_flag"
    PERMISSION = "permission"


_FSC_BASE = {FaultKind.TRANSLATION: 0b000100, FaultKind.ACCESS_FLAG: 0b001000,
             FaultKind.PERMISSION: 0b001100}


@attrs.frozen
class GuestAbort:
    """A stage-2 abort as ESR_EL2/HPFAR_EL2 would describe it (rules §1.5).

    ``ipa`` is the faulting IPA (page aligned, as HPFAR gives it); ``level`` is
    the level the walk stopped at (for permission faults: the level of the
    existing leaf, so ``fault_granule = granule(level)``); ``write`` is WnR;
    ``exec`` means an instruction abort (EC 0x20).
    """

    ipa: int
    kind: FaultKind
    level: int
    write: bool = False
    exec: bool = False
    s1ptw: bool = False

    @property
    def gfn(self) -> int:
        return self.ipa >> PAGE_SHIFT

    @property
    def fsc(self) -> int:
        """xFSC[5:0]: type bits plus the level."""
        return _FSC_BASE[self.kind] | self.level

    @property
    def is_write_fault(self) -> bool:
        """``kvm_is_write_fault`` (rules §1.5)."""
        if self.s1ptw:
            return self.kind is FaultKind.PERMISSION
        if self.exec:
            return False
        return self.write

    @property
    def is_exec_fault(self) -> bool:
        return self.exec and not self.s1ptw


class Exit(enum.Enum):
    """What ``handle_guest_abort`` tells the vCPU run loop."""

    RESUME = "resume"  # return to the guest; it retries the access
    MMIO = "mmio"  # KVM_EXIT_MMIO to the VMM (no memslot, or a write to a RO slot)
    EFAULT = "efault"  # KVM_RUN fails with -EFAULT (the host has no page)


class NotifierEvent(enum.Enum):
    """``enum mmu_notifier_event`` (rules §5.1), plus the 2023 proposal's
    PROTECTION_UPGRADE (§5.4, seed 003), which the platform raises for mprotect
    back to read-write so that the cost of zapping on it is visible."""

    UNMAP = "unmap"
    CLEAR = "clear"
    PROTECTION_VMA = "protection_vma"
    PROTECTION_PAGE = "protection_page"
    PROTECTION_UPGRADE = "protection_upgrade"
    MIGRATE = "migrate"
    RELEASE = "release"


@attrs.frozen
class NotifierRange:
    """``struct mmu_notifier_range``: VMM addresses ``[start, end)``."""

    start: int
    end: int
    event: NotifierEvent


class SysReg(enum.Enum):
    SCTLR_EL1 = "SCTLR_EL1"


SCTLR_M = 1 << 0
SCTLR_C = 1 << 2


@attrs.frozen
class Capabilities:
    """What a candidate declares about itself (``Candidate.capabilities``).

    ``concurrent``: safe to run under the parallel machine (greenlet
    scheduler). ``fwb``/``hw_af``/``dic``: CPU features it supports; the
    generated configurations only turn on features every candidate under test
    supports. ``max_vcpus`` bounds the generated vCPU count.
    """

    concurrent: bool = False
    fwb: bool = True
    hw_af: bool = True
    dic: bool = True
    max_vcpus: int = 4
    block_mappings: bool = False

    def describe(self) -> str:
        flags = [name for name in ("concurrent", "fwb", "hw_af", "dic", "block_mappings")
                 if getattr(self, name)]
        return ", ".join(flags + [f"vcpus<={self.max_vcpus}"])


class Candidate:
    """Base class for candidates. Subclass it and override the methods.

    Every method runs with the platform's ``current_vcpu`` set where a vCPU is
    involved. Methods must return the documented types; anything else, an
    exception, or a step that does not return is reported as a *candidate
    error* naming the step.
    """

    #: Shown by ``stage2-conformance list``.
    capabilities: Capabilities = Capabilities()
    #: Version string recorded in replay files.
    version: str = "0"
    #: Set on known-bug mutants: the suite expects them to fail.
    known_bug: bool = False
    #: Ids of known findings (``conformance.findings``, docs/findings.md) this
    #: candidate keeps on purpose because KVM has them: when a program shows
    #: one, the run counts it instead of failing.
    known_findings: frozenset[str] = frozenset()

    def __init__(self, services, config: VmConfig):
        self.services = services
        self.config = config

    # vCPU lifecycle and trapped guest system-register accesses (rules §6.3, §6.4)
    def vcpu_init(self, vcpu: int) -> None:
        """``KVM_ARM_VCPU_INIT``: reset the vCPU (arm TVM without FWB)."""

    def handle_sysreg_write(self, vcpu: int, reg: SysReg, old: int, new: int) -> None:
        """A trapped write (only delivered while TVM is set for ``vcpu``)."""

    def handle_set_way(self, vcpu: int) -> None:
        """A trapped DC ISW/CSW/CISW (HCR_EL2.TSW is always set)."""

    # Memslots and dirty logging (rules §4)
    def commit_memory_region(self, old: Memslot | None, new: Memslot | None,
                             change: MemslotChange) -> None:
        """``kvm_arch_commit_memory_region`` (plus ``kvm_arch_flush_shadow_memslot``
        for DELETE and MOVE, which the harness does not call separately)."""

    def get_dirty_log(self, slot: Memslot) -> frozenset[int]:
        """``KVM_GET_DIRTY_LOG``: return the dirty gfns (absolute) and re-protect."""
        raise NotImplementedError

    # The fault path (rules §3)
    def handle_guest_abort(self, vcpu: int, fault: GuestAbort) -> Exit:
        raise NotImplementedError

    # MMU notifiers (rules §5)
    def invalidate_range_start(self, range: NotifierRange) -> None:
        raise NotImplementedError

    def invalidate_range_end(self, range: NotifierRange) -> None:
        raise NotImplementedError

    def clear_flush_young(self, range: NotifierRange) -> bool:
        raise NotImplementedError

    def clear_young(self, range: NotifierRange) -> bool:
        raise NotImplementedError

    def test_young(self, range: NotifierRange) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        """The notifier ``release`` (``exit_mmap``): tear the stage-2 down."""

    def destroy(self) -> None:
        """VM destruction: free everything still held."""
