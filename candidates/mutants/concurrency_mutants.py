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
    #: the leaf grants the access (see OUT_OF_BUDGET).
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
    #: fault break the leaf and remake it with fewer permissions (see
    #: OUT_OF_BUDGET).
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


MUTANTS = {
    "mutant-unmap-clean-before-tlbi": UnmapCleanBeforeTlbi,
    "mutant-fast-wrprotect-no-tlbi": FastWrprotectWithoutTlbi,
    "mutant-fault-skips-invalidate-retry": FaultSkipsInvalidateRetry,
}

#: Real races the generated programs do not reach within the ``ci`` budget
#: (nor, for most, within 5 x 300 ``dev`` programs). Not registered;
#: ``tests/test_mutants.py`` fails each on a scripted counterexample (and
#: passes its unmutated parent on it). Why the generator misses each one,
#: and what would reach it:
#:
#: * collapse-frees-at-once needs a parallel step in which one fault collapses
#:   a table (a THP-backed 2 MiB window still mapped by 4 KiB pages after
#:   dirty logging was turned off) while another task is inside an RCU
#:   read-side section (any shared walk). ``fault_race`` always migrates the
#:   page first (``refault=True``): that unmaps the whole THP and prunes the
#:   table, so it never collapses; ``parallel`` and ``host_race`` collapse
#:   only when they land, without refault, on an unmapped page of such a
#:   window. kvm-classic on the parallel machine collapsed in 16 parallel
#:   steps of 321 ``dev`` programs (seed 0), and at none of them was another
#:   task inside a walk; the mutant was caught in none of 5 x 300 ``dev``
#:   programs (seeds 0-4). Would reach it: a race rule for collapses, i.e.
#:   two or three faults without refault on unmapped pages of a window left
#:   with 4 KiB tables (the ``migrated`` start, a slot whose logging was
#:   turned off), with a preemption inside one fault's walk (``read_pte``,
#:   ``pte store``);
#: * collapse-teardown-inline needs a fault that installs a 4 KiB entry in a
#:   table another fault is collapsing into a block. In this model every
#:   fault in one 2 MiB window wants the same mapping size (THP backing is
#:   per window, logging per memslot, and both change only in sequential
#:   steps), so no program of the current generator can produce it, whatever
#:   the budget. In KVM it happens while ``KVM_SET_USER_MEMORY_REGION`` turns
#:   logging off: a vCPU whose fault looked the memslots up before the swap
#:   still sees the logging slot and maps 4 KiB (``synchronize_srcu`` waits for
#:   it; arm64's commit does nothing when logging stops) while a vCPU that
#:   looked them up after collapses the window. The script stages that: vCPU1
#:   sees the memslot array from before the flags change. Would reach it: a
#:   parallel-step operation that changes a memslot's logging flag with SRCU
#:   semantics (faults in flight keep the old memslots until it returns);
#: * dirty-mark-before-install needs ``host_race`` with a harvest of a
#:   logging slot and a write fault that GUPs, preempted exactly between its
#:   GUP (where this mutant marks) and ``read_lock``, with the harvest as the
#:   task that runs: the harvest is one host operation in nine of
#:   ``host_race``, ``read_lock`` one preemption kind in eight, and the
#:   preemption must name the fault's task and after=1. The ``ci`` stream
#:   does not catch it in 300 programs; ``dev`` seeds 0-4 (300 programs each)
#:   first at programs: never, 306, 27, 72, 89. Would reach it:
#:   when ``host_race`` draws a harvest, preempt a writing fault at its
#:   ``read_lock`` (or first ``pte store``) in favour of the harvest;
#: * resched-unmap-stale-root needs ``release`` (``exit_mmap``) to run while a
#:   resumable unmap has dropped ``mmu_lock`` between two 1 GiB chunks, and
#:   the detached tables' RCU grace period to end before the unmap walks on.
#:   A parallel step's invalidation covers one page, so it never crosses a
#:   1 GiB boundary (memslot DELETE/MOVE, which could, are sequential steps);
#:   and RCU callbacks run as late as possible (when no other task can run,
#:   or when the outermost call returns), so even with such an unmap and a
#:   ``release`` in one step, ``destroy`` would run after the unmap finished
#:   (the unmapper holds no RCU read lock; in the kernel the grace period may
#:   end while it sleeps in ``cond_resched``). The script is the one of
#:   tests/test_kvm_parallel.py: the release and its grace period run inside
#:   the unmap's ``cpu_relax``. Would reach it: invalidations (or memslot
#:   deletes) crossing a 1 GiB IPA boundary in parallel steps, with a
#:   ``release``, and RCU callbacks as scheduler tasks that may run as soon
#:   as they are eligible (a preemption target), not only last.
#: * relax-no-tlbi-on-eagain (``tlb-maintenance``, rules §9.3 T4) needs a
#:   page mapped with fewer permissions than two vCPUs' accesses want (a
#:   read maps it XN without DIC, read-only in a logging slot), then both
#:   faulting on it at once *without* a refault (``fault_race`` migrates
#:   the page first in most steps, which makes the faults translation
#:   faults), the first preempted at its first ``pte store`` (the
#:   ``relax_perms`` ``cmpxchg``) in favour of the other. The derandomized
#:   ``ci`` stream is sensitive to every generator change: with the
#:   generator of d2e11e3 it first fails at program 317 (``max_examples``
#:   300), with an in-flight version of the race rules of cb1b637 at
#:   program 3, with those of 86ebe2d not within 60. Would reach it: when
#:   ``fault_race`` does not refault and the page is mapped with fewer
#:   permissions than its operations need, preempt the first at its first
#:   ``pte store`` in favour of another vCPU's;
#: * map-downgrades-permissions (``break-before-make``, rules §2.5 map step
#:   3) needs a read fault on an unmapped page preempted before its walk
#:   while another vCPU's fetch (or write, in a logging slot) maps the page
#:   with more permissions. ``fault_race`` reaches it easily (d2e11e3: the
#:   ``ci`` stream fails at program 7), but the race rules of cb1b637 shift
#:   the stream: an in-flight version caught it at program 61, 86ebe2d's
#:   not within 60. Would reach it reliably: in
#:   ``fault_race``, draw a read together with a fetch or write more often,
#:   preempting the reader at its GUP.
OUT_OF_BUDGET = {
    "mutant-collapse-frees-at-once": CollapseFreesAtOnce,
    "mutant-collapse-teardown-inline": CollapseTeardownInline,
    "mutant-dirty-mark-before-install": DirtyMarkBeforeInstall,
    "mutant-resched-unmap-stale-root": ReschedUnmapStaleRoot,
    "mutant-relax-no-tlbi-on-eagain": RelaxNoTlbiOnEagain,
    "mutant-map-downgrades-permissions": MapDowngradesPermissions,
}

#: Real bugs no property family can fail on this platform (not registered,
#: no script can fail them). None at present: the two that were here
#: (relax-no-tlbi-on-eagain, map-downgrades-permissions), whose only symptom
#: is one extra fault, fail since the monitors check rules §9.3 T4
#: (``tlb-maintenance``) and §2.5 map step 3 (``break-before-make``)
#: directly; they are in :data:`OUT_OF_BUDGET`.
NOT_OBSERVABLE: dict[str, type] = {}
