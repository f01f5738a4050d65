"""Mutants of :mod:`candidates.reference` (issue: foundation).

Each names the bug it reproduces and the property family expected to catch it
(``expected_property``); the names are those of :mod:`conformance.platform.monitors`
and of the oracle checks in :mod:`conformance.machines.sequential`.
"""

from __future__ import annotations

import attrs

from candidates.common import PageTable
from candidates.reference import ReferenceCandidate
from model import descriptors as d


class _ReferenceMutant(ReferenceCandidate):
    """Mutants run on the sequential machine: their bugs need no concurrency."""

    known_bug = True
    capabilities = attrs.evolve(ReferenceCandidate.capabilities, concurrent=False)


class _NoTlbiPageTable(PageTable):
    def unmap(self, start, end):
        real = self.svc.tlb_flush_vmid_ipa
        # Leaf TLBIs only: the walk-cache invalidation of pruned tables stays.
        self.svc.tlb_flush_vmid_ipa = lambda ipa, level=None: (
            real(ipa, level) if level is None else None)
        try:
            return super().unmap(start, end)
        finally:
            del self.svc.tlb_flush_vmid_ipa
            assert self.svc.tlb_flush_vmid_ipa == real


class NoTlbiAfterUnmap(_ReferenceMutant):
    """Unmap clears the leaf but never invalidates the TLB (rules §9.3 T2)."""

    known_bug = True
    bug = "unmap leaves a stale TLB entry (no TLBI after clearing the leaf)"
    expected_property = ("stale-translation", "tlb-conflict")

    def __init__(self, services, config):
        super().__init__(services, config)
        self.pgt.__class__ = _NoTlbiPageTable


class _NoCmoPageTable(PageTable):
    def install(self, ptep, old, new, ipa, level):
        clean, self.clean = self.clean, lambda pte, level: None
        try:
            super().install(ptep, old, new, ipa, level)
        finally:
            self.clean = clean


class NoCmoOnMap(_ReferenceMutant):
    """No clean+invalidate to PoC when a page is mapped: a guest with its
    caches off reads stale memory (rules §6.5 G-C1, §8 bug 2)."""

    known_bug = True
    bug = "new stage-2 mapping without clean+invalidate to PoC"
    expected_property = ("guest-observation",)

    def __init__(self, services, config):
        super().__init__(services, config)
        self.pgt.__class__ = _NoCmoPageTable


class NoDirtyMark(_ReferenceMutant):
    """A logged write fault maps the page writable but never marks it dirty
    (rules §4.3, §9.4 D2)."""

    known_bug = True
    bug = "no mark_page_dirty on a writable install while logging"
    expected_property = ("dirty-logging", "dirty-log-harvest")

    def __init__(self, services, config):
        super().__init__(services, config)
        services_ = self.services

        class _Shim:
            def __getattr__(self, name):
                return getattr(services_, name)

            def mark_page_dirty(self, slot, gfn):
                pass

        self.services = _Shim()


class _RelaxInPlacePageTable(PageTable):
    def install(self, ptep, old, new, ipa, level):
        if d.is_valid(old) and d.pte_pa(old) == d.pte_pa(new):
            self.svc.write_pte(ptep, new)  # permissions only: no BBM, no TLBI
            return
        super().install(ptep, old, new, ipa, level)


class RelaxWithoutTlbi(_ReferenceMutant):
    """Permission relaxation updates the PTE in place without any TLBI: the
    faulting vCPU keeps hitting its cached read-only entry (rules §7.5,
    §8 bug 14)."""

    known_bug = True
    bug = "permission relaxation without TLBI"
    expected_property = ("forward-progress",)

    def __init__(self, services, config):
        super().__init__(services, config)
        self.pgt.__class__ = _RelaxInPlacePageTable


class LoggingWithoutWrprotect(_ReferenceMutant):
    """Enabling dirty logging does not write-protect existing mappings
    (rules §4.2, §9.4 D1)."""

    known_bug = True
    bug = "dirty logging enabled without write-protecting existing mappings"
    expected_property = ("dirty-logging", "dirty-log-harvest")

    def commit_memory_region(self, old, new, change):
        if new is not None and new.is_logging and not (old and old.is_logging):
            return
        super().commit_memory_region(old, new, change)


MUTANTS = {
    "mutant-no-tlbi-after-unmap": NoTlbiAfterUnmap,
    "mutant-no-cmo-on-map": NoCmoOnMap,
    "mutant-no-dirty-mark": NoDirtyMark,
    "mutant-relax-without-tlbi": RelaxWithoutTlbi,
    "mutant-logging-without-wrprotect": LoggingWithoutWrprotect,
}
