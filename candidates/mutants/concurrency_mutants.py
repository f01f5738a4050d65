"""Known-bug mutants that need concurrency: the parallel machine's corpus.

Each is a small subclass of ``kvm-classic``
(:class:`~candidates.classic.ClassicCandidate`, page tables
:class:`~candidates.pgtable.Stage2PgTable`) or of ``kvm-parallel``
(:class:`~candidates.kvm_parallel.KvmParallelCandidate`) that reintroduces one
bug of the parallel fault-handling designs (rules §7, §8; seeds 000-002).
Every one runs on the parallel machine (``machine = "parallel"``, capabilities
``concurrent=True``); some show already in a sequential step of such a
program. Metadata as in :mod:`candidates.mutants.classic_mutants`: ``bug``,
``reference`` and ``expected_property`` (the property family that sees the
bug's first symptom).

:data:`MUTANTS` joins the registered corpus (``tests/test_mutants.py``: caught
by the derandomized ``ci`` profile within 60 programs, by an expected family,
shrunk to at most 10 steps, each parallel step to at most 3 operations and 4
preemptions, replayed three times identically; unmutated parent passes the
shrunk program). :data:`OUT_OF_BUDGET` holds the bugs the generated programs
do not reach; ``tests/test_mutants.py`` drives each through a scripted
counterexample, and the comment above the dict says why the generator misses
it and what would reach it. :data:`NOT_OBSERVABLE` holds bugs the platform
cannot fail at all today (no property is violated by their only symptom).
"""

from __future__ import annotations

import attrs

from candidates import kvm_parallel
from candidates.classic import ClassicCandidate
from candidates.kvm_parallel import KvmParallelCandidate, ParallelStage2PgTable
from candidates.mutants.classic_mutants import _PATCHES, _patched
from candidates.pgtable import (
    EINVAL, HANDLE_FAULT, LEAF, SHARED, TABLE_POST, Ctx, Stage2PgTable)
from conformance.protocol import PAGE_SIZE
from model import descriptors as d

_CONCURRENT = attrs.evolve(ClassicCandidate.capabilities, concurrent=True)


def _original(obj, name):
    """``obj.name`` as it is when no task has it patched (:func:`_patched`
    installs a per-task dispatcher while any task has): what a patch that
    wraps the service must call, or it would call itself through the
    dispatcher when two tasks patch at once."""
    patched = _PATCHES.get((id(obj), name))
    return getattr(obj, name) if patched is None else patched[0]


class _ClassicRaceMutant(ClassicCandidate):
    """A ``kvm-classic`` mutant for the parallel machine."""

    known_bug = True
    machine = "parallel"
    capabilities = _CONCURRENT


class _ParallelRaceMutant(KvmParallelCandidate):
    """A ``kvm-parallel`` mutant for the parallel machine."""

    known_bug = True
    machine = "parallel"
    capabilities = attrs.evolve(KvmParallelCandidate.capabilities, concurrent=True)


# ============================================== 1. collapse: free at once
class _CollapseFreesAtOncePgTable(Stage2PgTable):
    def free_unlinked_table(self, table, level):
        self.free_unlinked(table, level)  # BUG: no call_rcu, no grace period


class CollapseFreesAtOnce(_ClassicRaceMutant):
    """Table→block collapse (``stage2_map_walk_table_pre`` → ``try_leaf``)
    unlinks the old table with break-before-make and a span-wide TLBI, then
    frees the detached subtree at once (``kvm_pgtable_stage2_free_unlinked``
    called directly) instead of through ``mm_ops->free_unlinked_table``
    (``stage2_free_unlinked_table`` → ``call_rcu``). Under the read side of
    mmu_lock another vCPU's shared walk may have read the table entry before
    the unlink and still be inside the subtree; only an RCU grace period
    orders the free after it (rules §7.3, §7.4, §9.7 L2; seed 001)."""

    bug = "table->block collapse frees the unlinked subtree at once (no RCU grace period)"
    reference = "§7.3, §7.4, §9.7 L2, seed 001"
    expected_property = ("table-lifecycle",)
    pgtable_cls = _CollapseFreesAtOncePgTable


# ================================ 2. collapse: inline teardown, not owned
class _CollapseTeardownInlinePgTable(Stage2PgTable):
    def free_unlinked_table(self, table, level):
        svc = self.svc
        pages = [table]

        # BUG: the subtree's entries are put now, by a walker that does not
        # own them (no LOCKED marker on each entry, no grace period first);
        # only the pages seen by this walk are freed after the grace period.
        def cb(ctx: Ctx, visit: int) -> int:
            if d.is_counted(ctx.old):
                svc.put_page(ctx.ptep)
                if d.is_table(ctx.old, ctx.level):
                    pages.append(d.pte_pa(ctx.old))
            return 0

        self._walk_detached(table, level + 1, cb, LEAF | TABLE_POST)
        svc.call_rcu(lambda: [svc.put_page(page) for page in reversed(pages)])


class CollapseTeardownInline(_ClassicRaceMutant):
    """Table→block collapse tears the unlinked subtree down inline, in the
    map walker that broke the table entry (``stage2_map_walk_table_pre``),
    dropping each entry's reference now, and leaves only the pages it saw to
    an RCU callback: it does not own the subtree (v1 of the 2022 series
    locked every descendant entry first, ``stage2_unlink_pte``; the merged
    design does the whole teardown in ``stage2_free_unlinked_table``'s RCU
    callback). A vCPU that read the table entry before the unlink installs an
    entry under it after the walk went past: that entry's reference keeps
    the table page alive for ever, a leak (seed 001, Oliver Upton: "What
    would stop another software walker from installing a table to a PTE
    that I've already visited? ... leaking a table page"; rules §7.4, §9.1
    S2)."""

    bug = "collapse tears the unlinked subtree down inline (not owned): a racing install leaks"
    reference = "§7.4, §9.1 S2, seed 001"
    #: The leak shows at teardown (the unlinked table is not refcount-checked).
    expected_property = ("table-lifecycle",)
    pgtable_cls = _CollapseTeardownInlinePgTable


# =========================================== 3. no mmu_invalidate_retry
class FaultSkipsInvalidateRetry(_ClassicRaceMutant):
    """``user_mem_abort`` takes mmu_lock and installs without
    ``mmu_invalidate_retry(kvm, mmu_seq)``: a fault whose GUP ran before an
    MMU-notifier invalidation of the page installs the page the host has
    just unmapped (migrated, zapped), during the invalidation or after it
    (rules §3.2 steps 9 and 14, §5.1, §9.5 N2, §9.2 G1)."""

    bug = "fault path installs without the mmu_invalidate_retry check (stale pfn after a notifier)"
    reference = "§3.2 steps 9/14, §5.1, §9.5 N2, §9.2 G1"
    expected_property = ("stale-translation", "memslot-fidelity")

    def mmu_invalidate_retry(self, seq):
        return False  # BUG


# ==================================== 4. relax_perms: no TLBI on -EAGAIN
class _RelaxNoTlbiOnEagainPgTable(Stage2PgTable):
    def relax_perms(self, addr, prot):
        set_, clr = self.relax_attrs(prot)
        ret, level, _ = self.update_leaf_attrs(addr, PAGE_SIZE, set_, clr,
                                               SHARED | HANDLE_FAULT)
        if ret == 0:  # BUG: `if (!ret)`, as before Sep 2023 (not on -EAGAIN)
            self.svc.tlb_flush_vmid_ipa_nsh(addr, level)
        return ret


class RelaxNoTlbiOnEagain(_ClassicRaceMutant):
    """``kvm_pgtable_stage2_relax_perms`` issues its local TLBI only when the
    walk returned 0, not on ``-EAGAIN`` (the ``cmpxchg`` lost to another
    vCPU's relaxation, or the entry was LOCKED): the losing vCPU keeps the
    permission-faulting entry it cached (rules §1.5 rule 1) and faults again
    (rules §2.5 relax_perms, §7.5, §9.3 T4; §8 bug 14, "KVM: arm64: Always
    invalidate TLB for stage-2 permission faults", Sep 2023, Oliver
    Upton)."""

    bug = "relax_perms skips the local TLBI when its cmpxchg lost the race (-EAGAIN)"
    reference = "§2.5, §7.5, §9.3 T4, §8 bug 14 (2023)"
    #: The losing vCPU faults only once more (it then finds the leaf relaxed
    #: and invalidates), so forward progress holds; the T4 monitor sees its
    #: permission fault return with the faulting entry still cached while
    #: the leaf grants the access (rules §9.3 T4).
    expected_property = ("tlb-maintenance",)
    pgtable_cls = _RelaxNoTlbiOnEagainPgTable


# ==================================== 5. dirty mark before the install
class DirtyMarkBeforeInstall(_ClassicRaceMutant):
    """``user_mem_abort`` marks the gfn dirty (``mark_page_dirty_in_slot``)
    as soon as GUP returned a writable page, before it takes mmu_lock and
    installs the writable leaf, instead of after the install (≤v6.12 under
    mmu_lock, v6.13+ after unlocking but before the vCPU resumes). A
    ``KVM_GET_DIRTY_LOG`` between the two harvests the mark and
    write-protects a page that is not writable yet; the install then leaves
    a writable leaf with no mark, and the next writes are lost to the VMM
    (the forbidden order of rules §9.4 D2: mark → harvest → install; §3.2
    step 19, §4.3)."""

    bug = "dirty mark made before the writable install (a harvest in between loses the page)"
    reference = "§3.2 step 19, §4.3, §9.4 D2"
    expected_property = ("dirty-logging", "dirty-log-harvest")

    def user_mem_abort(self, fault, slot):
        svc = self.services
        if not (slot.is_logging and fault.is_write_fault):
            return super().user_mem_abort(fault, slot)
        gup, mark = _original(svc, "gup"), _original(svc, "mark_page_dirty")

        def gup_and_mark(hva, write):
            page = gup(hva, write)
            if page is not None and page.writable:
                mark(slot, fault.gfn)  # BUG: before the install
            return page

        with _patched(svc, "gup", gup_and_mark), \
                _patched(svc, "mark_page_dirty", lambda s, gfn: None):
            return super().user_mem_abort(fault, slot)


# ============================== 6. map downgrades an identical mapping
class _MapDowngradesPgTable(Stage2PgTable):
    def _map_walker(self, phys, prot, force_pte):
        cb = super()._map_walker(phys, prot, force_pte)

        def unfiltered(ctx, visit):
            # BUG: no "permission-only change" filter (rules §2.5 map step 3):
            # only the exact same leaf is tolerated (KVM before 2021); a
            # leaf differing in permissions is broken and rebuilt.
            with _patched(d, "perm_only_change", lambda old, new: old == new):
                return cb(ctx, visit)

        return unfiltered


class MapDowngradesPermissions(_ClassicRaceMutant):
    """``stage2_map_walker_try_leaf`` lacks the 2021 filter "old and new both
    valid and differing only in permissions → ``-EAGAIN``": a vCPU whose
    translation fault went stale (another vCPU mapped the page writable
    meanwhile) breaks the writable leaf and maps it read-only again. The
    writer faults again (the map path never lowers permissions,
    ``relax_perms`` only adds them: rules §2.5 map step 3, §3.2.1, §7.2)."""

    bug = "map path downgrades the permissions of an identical existing mapping (no filter)"
    reference = "§2.5 map step 3, §3.2.1, §7.2"
    #: The writer only faults once more and relaxes the leaf again, so
    #: forward progress holds; the monitor of map step 3 sees the stale
    #: fault break the leaf and remake it with fewer permissions (rules
    #: §9.3 T7).
    expected_property = ("break-before-make",)
    pgtable_cls = _MapDowngradesPgTable


# ================================ 7. clean+invalidate before the TLBI
class _UnmapCleanBeforeTlbiPgTable(Stage2PgTable):
    def unmap_put_pte(self, ctx, child, defer):
        svc = self.svc
        svc.write_pte(ctx.ptep, 0)
        if child is None:
            super().unmap_clean(ctx)  # BUG: the clean comes before the TLBI, not after it
            if not defer:
                svc.tlb_flush_vmid_ipa(ctx.addr, ctx.level)
        else:
            svc.tlb_flush_vmid_ipa(ctx.addr, None)
        svc.put_page(ctx.ptep)

    def unmap_clean(self, ctx):
        pass  # done above, too early


class UnmapCleanBeforeTlbi(_ClassicRaceMutant):
    """``stage2_unmap_walker`` cleans+invalidates an unmapped cacheable leaf
    to PoC before ``stage2_unmap_put_pte``'s TLBI instead of after it
    (without FWB): until the TLBI a vCPU can still write through its TLB
    entry and dirty the line again, and the page leaves stage 2 with a dirty
    line the host's copy (migration, swap-out) does not see (rules §2.5
    unmap, §6.2, §9.6 C3)."""

    bug = "unmap cleans+invalidates the page before the TLBI instead of after (no FWB)"
    reference = "§2.5 unmap, §6.2, §9.6 C3"
    expected_property = ("cache-maintenance",)
    pgtable_cls = _UnmapCleanBeforeTlbiPgTable


# ===================== 8. kvm-parallel: resched without re-reading root
class _FreedPgdKeepsItsAddress(ParallelStage2PgTable):
    """A ``struct kvm_pgtable`` as C sees it after ``kvm_pgtable_stage2_destroy``:
    the freed PGD's address is still in ``pgt->pgd`` (Python's ``None``
    would only make the stale walk crash the candidate)."""

    def destroy(self):
        pgd = self.pgd
        super().destroy()
        self.pgd = pgd


class ReschedUnmapStaleRoot(_ParallelRaceMutant):
    """``stage2_apply_range`` with ``resched`` reads ``mmu->pgt`` once and
    keeps using it after ``cond_resched_rwlock_write`` dropped and retook
    mmu_lock: a ``release`` (``kvm_free_stage2_pgd`` from ``exit_mmap``)
    that ran meanwhile has detached and, after a grace period, destroyed
    the tables, and the next chunk walks freed memory (rules §5.3, §9.7 L4;
    §8 bug 1, "kvm: arm/arm64: Fix use after free of stage2 page table",
    2017, Suzuki K Poulose; seed 002)."""

    bug = "resumable unmap keeps the root it read before dropping mmu_lock (no re-check)"
    reference = "§5.3, §9.7 L4, §8 bug 1 (2017), seed 002"
    expected_property = ("table-lifecycle",)
    pgtable_cls = _FreedPgdKeepsItsAddress

    def stage2_apply_range(self, addr, end, fn):
        pgt = self.pgt  # BUG: read once, before the loop
        if pgt is None:
            return EINVAL
        while True:
            next_ = kvm_parallel.stage2_range_addr_end(addr, end)
            ret = fn(pgt, addr, next_ - addr)
            if ret or next_ == end:
                return ret
            self.cond_resched_rwlock_write()
            addr = next_


# ============== 9. kvm-parallel: fast write-protection fault, no TLBI
class FastWrprotectWithoutTlbi(_ParallelRaceMutant):
    """The lockless write-protection fault (``fast_page_fault`` →
    ``kvm_pgtable_stage2_relax_perms`` under RCU alone) relaxes the leaf
    with ``cmpxchg`` but issues no local TLBI, the x86 way: arm64 may keep
    the read-only entry that caused the fault (rules §1.5 rule 1), so the
    vCPU takes the same fault for ever (rules §7.5, §9.3 T4, §9.2 G5; seed
    000, Ricardo Koller: "unlike x86, in ARM the TLB entry related to a
    protection fault needs to be flushed")."""

    bug = "lockless write-protection fault relaxes the leaf without the local TLBI"
    reference = "§7.5, §9.3 T4, §9.2 G5, seed 000"
    expected_property = ("forward-progress",)

    def fast_page_fault(self, fault, slot):
        with _patched(self.services, "tlb_flush_vmid_ipa_nsh",
                      lambda ipa, level=None: None):  # BUG
            return super().fast_page_fault(fault, slot)


#: Each one is reached by the race rule drawn for it (``conformance.machines.
#: parallel``; docs/parallel.md lists them): seed 001's collapse race by
#: ``collapse_race``; seed 002's stale root by ``unmap_race`` (a 4 MiB
#: invalidation across 1 GiB racing ``release``); the lost ``cmpxchg`` by
#: ``relax_race``; the others by ``fault_race``, ``host_race`` or already by a
#: sequential step of a warm start.
MUTANTS = {
    "mutant-unmap-clean-before-tlbi": UnmapCleanBeforeTlbi,
    "mutant-fast-wrprotect-no-tlbi": FastWrprotectWithoutTlbi,
    "mutant-fault-skips-invalidate-retry": FaultSkipsInvalidateRetry,
    "mutant-collapse-frees-at-once": CollapseFreesAtOnce,
    "mutant-resched-unmap-stale-root": ReschedUnmapStaleRoot,
    "mutant-relax-no-tlbi-on-eagain": RelaxNoTlbiOnEagain,
}

#: Real races the race rules reach, but not in the one derandomized ``ci``
#: stream that ``tests/test_mutants.py`` holds the corpus to: each is caught
#: in 4 of 5 seeded runs of the same budget (60 programs; ``stage2-conformance
#: mutants --profile ci --examples 60 --seeds 5``), so a generator change may
#: move it in or out of that one stream. Not registered; ``tests/
#: test_mutants.py`` fails each on a scripted counterexample written with the
#: same rules (and passes its unmutated parent on it):
#:
#: * collapse-teardown-inline (seed 001's leak): ``memslot_race``, a fault
#:   that looked the memslots up before dirty logging was turned off maps
#:   4 KiB in a table that a fault from after the change collapses;
#: * dirty-mark-before-install: ``dirty_race``, the write fault stopped
#:   between its GUP (where this mutant marks) and ``mmu_lock`` while the
#:   harvest runs;
#: * map-downgrades-permissions: ``relax_race`` after a migration, a read
#:   fault stopped before its walk while another vCPU's fetch maps the page
#:   executable.
OUT_OF_BUDGET = {
    "mutant-collapse-teardown-inline": CollapseTeardownInline,
    "mutant-dirty-mark-before-install": DirtyMarkBeforeInstall,
    "mutant-map-downgrades-permissions": MapDowngradesPermissions,
}

#: Real bugs no property family can fail on this platform (not registered,
#: no script can fail them). None at present: the two that were here
#: (relax-no-tlbi-on-eagain, map-downgrades-permissions), whose only symptom
#: is one extra fault, fail since the monitors check rules §9.3 T4
#: (``tlb-maintenance``) and §2.5 map step 3 (``break-before-make``)
#: directly.
NOT_OBSERVABLE: dict[str, type] = {}
