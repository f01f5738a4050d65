"""The fault-path monitors (conformance/platform/monitors.py): rules §9.3 T4
(``tlb-maintenance``: a handled permission fault leaves no weaker entry in
the faulting vCPU's TLB) and §2.5 map step 3 (``break-before-make``: a
fault never breaks a leaf only to remake it with fewer permissions).

Each is shown on a scripted race: the known-bug mutant fails it, its parent
``kvm-classic`` and the other faithful candidates pass it, and the cases
where KVM legitimately resumes without a TLBI (``mmu_invalidate_retry``)
are not blamed."""

from __future__ import annotations

import pytest

from candidates.classic import ClassicCandidate, ClassicEagerSplitCandidate
from candidates.kvm_parallel import KvmParallelCandidate
from candidates.mutants.concurrency_mutants import (
    MapDowngradesPermissions, RelaxNoTlbiOnEagain)
from candidates.pkvm import PkvmCandidate
from candidates.reference import ReferenceCandidate
from candidates.subtree_lock import SubtreeLockCandidate
from conformance.errors import PropertyViolation
from conformance.machines.parallel import OpSpec
from conformance.platform import monitors
from conformance.platform.scheduler import Preemption, Schedule
from conformance.protocol import Memslot, VmConfig
from strategies.layouts import Layout, Vma

HVA = 0x4000_0000
MIB2 = 2 << 20
GFN = 0x40000
#: Two vCPUs, no FWB, no DIC (a read maps XN, a fetch maps X), hardware AF.
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=True, dic=False, nr_vcpus=2)
_VMAS = (Vma(HVA, HVA + (512 << 12) + MIB2, False),)
#: One 2 MiB slot of 4 KiB pages (no THP); where=0 is gfn 0x40000, its
#: neighbour gfn 0x40001 (where=1).
PLAIN = Layout((Memslot(0, GFN, 512, HVA),), _VMAS, "cold", False)
#: The same, logging from birth: a read fault maps the page read-only.
LOGGING = Layout((Memslot(0, GFN, 512, HVA, log_dirty_pages=True),), _VMAS, "cold", False)

FAITHFUL = [ClassicCandidate, ClassicEagerSplitCandidate, KvmParallelCandidate,
            SubtreeLockCandidate, PkvmCandidate, ReferenceCandidate]


def _race(ops, *preemptions, where=0):
    return ("parallel", dict(where=where, ops=tuple(ops), schedule=Schedule(preemptions),
                             refault=False))


def _read(vcpu=0, where=0):
    return ("guest_read", dict(vcpu=vcpu, where=where, pages=1))


def _play(play, cls, layout, *steps):
    failure, _machine = play(cls, CONFIG, layout, *steps, machine="parallel")
    return failure


# =========================================================== T4 (relax_perms)
#: vCPU0 reads the page of a logging slot (mapped read-only; every vCPU's
#: TLB may cache that entry). Then both vCPUs write it: vCPU0's fault is
#: preempted just before its cmpxchg (relax_perms), vCPU1 relaxes the leaf
#: and invalidates its own TLB; vCPU0's cmpxchg then loses (-EAGAIN).
LOST_RELAX = (_read(), _race((OpSpec("write", 0), OpSpec("write", 1)),
                             Preemption(0, 1, "pte store", 1)))


def test_relax_without_the_tlbi_after_a_lost_cmpxchg_is_caught(play):
    failure = _play(play, RelaxNoTlbiOnEagain, LOGGING, *LOST_RELAX)
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "tlb-maintenance", str(failure)
    assert "vCPU0's write permission fault" in failure.message
    assert "T4" in failure.message


@pytest.mark.parametrize("cls", FAITHFUL, ids=lambda c: c.__name__)
def test_faithful_candidates_invalidate_after_a_lost_relaxation(play, cls):
    assert _play(play, cls, LOGGING, *LOST_RELAX) is None


#: vCPU0's write fault has read mmu_invalidate_seq and done GUP; preempted at
#: mmu_lock, it waits while a migration of the neighbour page runs to its
#: end and vCPU1's write fault relaxes the leaf. vCPU0 then sees the
#: sequence changed (arm64 v6.12's mmu_invalidate_retry is not ranged) and
#: resumes without touching the leaf or its TLB: a legitimate extra fault.
RETRY_AFTER_INVALIDATION = (
    _read(vcpu=1, where=1),  # back the neighbour, so that the migration applies
    _read(),
    _race((OpSpec("write", 0), OpSpec("invalidate", host_op="migrate", neighbour=True),
           OpSpec("write", 1)),
          Preemption(0, 1, "read_lock", 1)),
)


def test_a_fault_that_retries_after_an_invalidation_is_not_blamed(play, monkeypatch):
    failure = _play(play, ClassicCandidate, LOGGING, *RETRY_AFTER_INVALIDATION)
    assert failure is None, str(failure)
    # The exemption is what lets it pass: without it the retry is blamed.
    monkeypatch.setattr(monitors, "HOST_CHANGES", frozenset())
    monkeypatch.setattr(monitors.Monitors, "call_begins", _no_notifier_window)
    failure = _play(play, ClassicCandidate, LOGGING, *RETRY_AFTER_INVALIDATION)
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "tlb-maintenance", str(failure)


_real_call_begins = monitors.Monitors.call_begins


def _no_notifier_window(self, method, args):
    """``call_begins`` as if no notifier range were ever in progress."""
    in_progress, self.p.notifiers_in_progress = self.p.notifiers_in_progress, []
    try:
        return _real_call_begins(self, method, args)
    finally:
        self.p.notifiers_in_progress = in_progress


# ==================================================== map step 3 (downgrade)
#: On a fresh page, vCPU0 reads and vCPU1 fetches: vCPU0's translation
#: fault is preempted at its GUP, vCPU1 maps the page executable, then
#: vCPU0 maps it for its read (XN: no DIC, not a fetch). The old and new
#: leaves differ only in XN, so the map path must leave the leaf alone.
STALE_READ = (_race((OpSpec("read", 0), OpSpec("fetch", 1)), Preemption(0, 1, "gup", 1)),)


def test_a_map_that_downgrades_permissions_is_caught(play):
    failure = _play(play, MapDowngradesPermissions, PLAIN, *STALE_READ)
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "break-before-make", str(failure)
    assert "fewer permissions" in failure.message and "map step 3" in failure.message


#: The same with a write in a logging slot: the stale read would map the
#: page read-only over the writer's writable leaf.
STALE_READ_LOGGING = (_race((OpSpec("read", 0), OpSpec("write", 1)),
                            Preemption(0, 1, "gup", 1)),)


def test_a_map_that_drops_write_is_caught(play):
    failure = _play(play, MapDowngradesPermissions, LOGGING, *STALE_READ_LOGGING)
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "break-before-make", str(failure)
    assert "RW-" in failure.message and "R--" in failure.message, failure.message


@pytest.mark.parametrize("cls", FAITHFUL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layout, steps", [(PLAIN, STALE_READ),
                                           (LOGGING, STALE_READ_LOGGING)],
                         ids=["fetch", "logging write"])
def test_faithful_candidates_never_downgrade_on_a_stale_fault(play, cls, layout, steps):
    assert _play(play, cls, layout, *steps) is None
