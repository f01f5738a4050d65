"""``kvm-parallel-subtree-lock`` (candidates/subtree_lock.py,
docs/subtree-lock.md): its table→block collapse takes every entry of the
unlinked subtree with ``xchg`` (the 2022 RFC's ``stage2_unlink_pte``), so a
walker still inside the subtree can neither install unseen nor leak, and the
table pages are still freed only after an RCU grace period. Broken variants
of both halves are caught by the suite on the same scripted programs."""

from __future__ import annotations

import pytest

from candidates.kvm_parallel import KvmParallelCandidate
from candidates.pgtable import LEAF, TABLE_POST, Ctx
from candidates.subtree_lock import (
    PTRS_PER_TABLE, SubtreeLockCandidate, SubtreeLockStage2PgTable)
from conformance.errors import PropertyViolation
from conformance.machines.parallel import OpSpec
from conformance.platform.scheduler import Preemption, Schedule
from conformance.protocol import PAGE_SIZE, FaultKind, Memslot, VmConfig
from model import descriptors as d
from strategies.layouts import Layout, Vma

HVA = 0x4000_0000
GFN = 0x40000
LOCKED = d.INVALID_PTE_LOCKED
#: Two vCPUs, no FWB (the map path cleans), hardware AF; a 40-bit VM starts
#: at level 1, so a 2 MiB collapse breaks a level-2 entry over a level-3 table.
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=True, nr_vcpus=2)
#: One cold 2 MiB slot backed by a THP: where=0 is gfn 0x40000 (entry 0 of the
#: window's level-3 table), where=3 gfn 0x40005 (entry 5; its neighbour 0x40006
#: is entry 6), where=4 gfn 0x40100 (entry 256).
LAYOUT = Layout((Memslot(0, GFN, 512, HVA),), (Vma(HVA, HVA + (512 << 12), True),),
                "cold", False)


def write(vcpu=0, where=0):
    return ("guest_write", dict(vcpu=vcpu, where=where, pages=1))


def logging(on):
    return ("memslot_logging", dict(which=0, on=on))


#: Dirty logging on, page 0 written (a 4 KiB leaf in a new level-3 table),
#: logging off again: the next fault in the window maps a 2 MiB block and
#: collapses the table (rules §4.6).
MIGRATED = (logging(True), write(), logging(False))


# ------------------------------------------------------------------ the spy
class _Recorder:
    """The candidate's services, recording ``(vcpu, service, args, result)``
    of every call. ``four_kib_vcpu``'s ``host_mapping_size`` says 4 KiB: that
    vCPU's faults map pages where the others map the 2 MiB block (see
    :data:`RACE`)."""

    def __init__(self, svc, log, four_kib_vcpu=None):
        self._svc, self._log, self._four_kib_vcpu = svc, log, four_kib_vcpu

    def __getattr__(self, name):
        attr = getattr(self._svc, name)
        if not callable(attr):
            return attr

        def recorded(*args, **kwargs):
            vcpu = self._svc.current_vcpu
            result = attr(*args, **kwargs)
            if name == "host_mapping_size" and vcpu == self._four_kib_vcpu:
                result = PAGE_SIZE
            self._log.append((vcpu, name, args, result))
            return result
        return recorded


def spying(base, four_kib_vcpu=None):
    """``base`` with its service calls recorded in ``log``; ``faults`` holds
    one ``(fault, first, last)`` log slice per ``handle_guest_abort``."""

    class Spy(base):
        def __init__(self, services, config):
            self.log: list = []
            self.faults: list = []
            super().__init__(_Recorder(services, self.log, four_kib_vcpu), config)

        def handle_guest_abort(self, vcpu, fault):
            first = len(self.log)
            try:
                return super().handle_guest_abort(vcpu, fault)
            finally:
                self.faults.append((fault, first, len(self.log)))

    Spy.__name__ = f"Spy{base.__name__}"
    return Spy


def calls(log, name, vcpu=None):
    return [(args, result) for v, n, args, result in log
            if n == name and (vcpu is None or v == vcpu)]


def _play(play, cls, *steps, machine="sequential"):
    failure, machine = play(cls, CONFIG, LAYOUT, *steps, machine=machine)
    return failure, machine, machine.platform.candidate


# ===================================================== the sequential collapse
def test_the_collapse_takes_every_descendant_entry_with_xchg(play):
    """Pages 0 and 5 written while logging (two leaves in the level-3 table),
    logging off, then a write to page 256: one fault breaks the level-2
    entry, takes all 512 entries of the table with ``xchg`` to LOCKED, puts
    the two leaves' references, publishes the block, and leaves the table
    page to one ``call_rcu`` callback."""
    Spy = spying(SubtreeLockCandidate)
    failure, machine, spy = _play(play, Spy, logging(True), write(), write(where=3),
                                  logging(False), write(where=4))
    assert failure is None, str(failure)
    fault, first, last = spy.faults[-1]
    assert fault.kind is FaultKind.TRANSLATION and fault.gfn == GFN + 0x100
    during = spy.log[first:last]
    [(break_args, table_pte)] = [(a, r) for a, r in calls(during, "cmpxchg_pte")
                                 if d.is_table(r, 2)]
    anchor, table = break_args[0], d.pte_pa(table_pte)
    assert break_args[2] == LOCKED  # stage2_try_break_pte
    xchgs = calls(during, "xchg_pte")
    assert [args for args, _ in xchgs] == [(table + 8 * i, LOCKED)
                                          for i in range(PTRS_PER_TABLE)]
    taken = {(args[0] - table) // 8: old for args, old in xchgs if old}
    assert set(taken) == {0, 5} and all(d.is_leaf(old, 3) for old in taken.values())
    puts = [args[0] for args, _ in calls(during, "put_page")]
    assert puts == [anchor, table, table + 5 * 8]  # the anchor's, then the two leaves'
    assert len(calls(during, "call_rcu")) == 1
    # the anchor went from LOCKED to the block only after the last xchg
    make = max(i for i, (_v, n, a, _r) in enumerate(during)
               if n == "write_pte" and a[0] == anchor)
    assert max(i for i, (_v, n, _a, _r) in enumerate(during) if n == "xchg_pte") < make
    assert d.is_leaf(during[make][2][1], 2)
    # the table page's last reference is dropped by the callback, right after
    # the fault returned (the puts above were its two entries'), before teardown
    assert spy.log[last][1:3] == ("put_page", (table,))
    counters = machine.platform.counters
    assert counters["table pages allocated"] == counters["table pages freed"]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "exclusive"])
def test_the_teardown_recurses_into_every_table_below(shared):
    """A detached level-2 table with a level-3 table under entry 3 (the shape
    a 1 GiB collapse unlinks; the generated programs collapse 2 MiB windows
    only): every entry of both pages is taken, each page is left with its
    own first reference, children listed before parents, and the callback
    frees both."""
    from conformance.platform.core import Platform
    from model.memory import PageUse

    p = Platform(CONFIG)
    p.step = "boot"
    p.candidate = p.construct(SubtreeLockCandidate)
    svc, pgt = p.services, p.candidate.pgt
    l2, l3 = svc.zalloc_page(), svc.zalloc_page()
    svc.write_pte(l3 + 7 * 8, d.make_leaf(0x8000_0000, 3, d.Prot.R, False))
    svc.get_page(l3)
    svc.write_pte(l2 + 3 * 8, d.Table(l3).encode())
    svc.get_page(l2)
    assert pgt.unlink_subtree(l2, 2, shared) == [l3, l2]
    for page in (l2, l3):
        assert p.mem.tables[page >> 12] == [LOCKED] * PTRS_PER_TABLE
        assert svc.page_count(page) == 1
    pgt.free_unlinked_pages([l3, l2])
    assert p.mem.page_use(l2 >> 12) is PageUse.TABLE  # not before the grace period
    p.grace_period()
    assert p.mem.page_use(l2 >> 12) is PageUse.FREED is p.mem.page_use(l3 >> 12)
    p.destroy()  # the leak checks


# ================================================================ races
#: vCPU0 writes page 5 (entry 5), vCPU1 its neighbour, page 6 (entry 6). vCPU1
#: sees the host mapping as 4 KiB (the recorder's ``four_kib_vcpu``), so its
#: fault installs a page in the level-3 table while vCPU0's maps the block
#: and collapses the table. The generated programs never do this: two faults
#: on one 2 MiB window see the same THP and logging state, so the second one
#: tries to collapse too and fails its cmpxchg on the table entry. It is the
#: install the RFC guards against (Oliver Upton: "What would stop another
#: software walker from installing a table to a PTE that I've already
#: visited?").
RACE = (OpSpec("write", 0), OpSpec("write", 1, neighbour=True))
#: vCPU1 goes first (the first point of vCPU0's task switches to it) and is
#: preempted before its fifth read_pte, the level-3 entry: it has read the
#: level-2 entry as a table (level 1, its re-read, level 2, its re-read) and
#: is inside the subtree when vCPU0 collapses it.
INSIDE = (Preemption(0, 1, None, 1), Preemption(1, 5, "read_pte", 0))


def _race(*preemptions):
    return ("parallel", dict(where=3, ops=RACE, schedule=Schedule(INSIDE + preemptions)))


#: vCPU0 is preempted before its third PTE store: after the break of the
#: level-2 entry and its first xchg (entry 0). vCPU1 installs entry 6, which
#: the teardown has not reached yet.
AFTER_FIRST_XCHG = _race(Preemption(0, 3, "pte store", 1))
#: vCPU0 is preempted before its ninth PTE store: it has taken entries 0-6.
#: vCPU1 finds its entry LOCKED.
AFTER_ITS_ENTRY = _race(Preemption(0, 9, "pte store", 1))
#: As AFTER_FIRST_XCHG, and vCPU1 is preempted once more at its first CMO,
#: inside its own break-before-make (entry 6 LOCKED by vCPU1): vCPU0's xchg
#: of entry 6 gets LOCKED back and spins until vCPU1 has published.
INSIDE_ITS_BBM = _race(Preemption(0, 3, "pte store", 1),
                       Preemption(1, 1, "dcache_clean_inval_poc", 0))
ENTRY_6 = 6 * 8


def _entry_6_xchgs(spy, table):
    return [old for args, old in calls(spy.log, "xchg_pte", vcpu=0)
            if args[0] == table + ENTRY_6]


def _collapsed_table(spy):
    [(_args, table_pte)] = [(a, r) for a, r in calls(spy.log, "cmpxchg_pte", vcpu=0)
                            if d.is_table(r, 2)]
    return d.pte_pa(table_pte)


def test_an_install_under_the_subtree_after_the_first_xchg_is_taken_and_nothing_leaks(play):
    Spy = spying(SubtreeLockCandidate, four_kib_vcpu=1)
    failure, machine, spy = _play(play, Spy, *MIGRATED, AFTER_FIRST_XCHG,
                                  machine="parallel")
    assert failure is None, str(failure)  # teardown's leak check included
    assert "parallel: a preemption fired" in machine.events
    table = _collapsed_table(spy)
    # vCPU1's install in the unlinked table succeeded ...
    [(args, found)] = [(a, r) for a, r in calls(spy.log, "cmpxchg_pte", vcpu=1)
                       if a[0] == table + ENTRY_6]
    assert found == 0 and args[2] == LOCKED
    [(_ptep, leaf)] = [a for a, _r in calls(spy.log, "write_pte", vcpu=1)
                       if a[0] == table + ENTRY_6]
    assert d.is_leaf(leaf, 3)
    # ... and vCPU0's xchg took it and dropped its reference
    assert _entry_6_xchgs(spy, table) == [leaf]
    assert (table + ENTRY_6,) in [a for a, _r in calls(spy.log, "put_page", vcpu=0)]
    counters = machine.platform.counters
    assert counters["table pages allocated"] == counters["table pages freed"]


def test_a_fault_that_reaches_an_entry_already_taken_backs_off(play):
    Spy = spying(SubtreeLockCandidate, four_kib_vcpu=1)
    failure, machine, spy = _play(play, Spy, *MIGRATED, AFTER_ITS_ENTRY, machine="parallel")
    assert failure is None, str(failure)
    table = _collapsed_table(spy)
    # vCPU1 read entry 6 as LOCKED and stored nothing in the table
    assert LOCKED in [r for a, r in calls(spy.log, "read_pte", vcpu=1)
                      if a[0] == table + ENTRY_6]
    assert not [a for a, _r in calls(spy.log, "cmpxchg_pte", vcpu=1) + calls(
        spy.log, "write_pte", vcpu=1) if table <= a[0] < table + PAGE_SIZE]
    assert _entry_6_xchgs(spy, table) == [0]


def test_the_xchg_spins_while_another_walker_holds_the_entry_locked(play):
    Spy = spying(SubtreeLockCandidate, four_kib_vcpu=1)
    failure, machine, spy = _play(play, Spy, *MIGRATED, INSIDE_ITS_BBM, machine="parallel")
    assert failure is None, str(failure)
    table = _collapsed_table(spy)
    first, second = _entry_6_xchgs(spy, table)
    assert first == LOCKED and d.is_leaf(second, 3)  # vCPU1's published page
    assert calls(spy.log, "cpu_relax", vcpu=0)
    assert machine.platform.counters["cpu_relax spins"] >= 1


# ============================================== the tests can fail
class _FreesAtOnce(SubtreeLockStage2PgTable):
    def free_unlinked_pages(self, pages):
        for page in pages:  # BROKEN: no call_rcu, no grace period
            self.svc.put_page(page)


class FreesAtOnce(SubtreeLockCandidate):
    """Broken: the issue's suggestion. The collapsing walker owns every
    entry, so it frees the table pages at once; vCPU1, which read the
    level-2 entry before the break, is still inside its RCU read-side
    section and about to read the level-3 table."""

    pgtable_cls = _FreesAtOnce


class _NotOwned(SubtreeLockStage2PgTable):
    def unlink_subtree(self, table, level, shared):
        svc, pages = self.svc, []

        def cb(ctx: Ctx, visit: int) -> int:
            if d.is_counted(ctx.old):  # BROKEN: read, not taken (no xchg)
                svc.put_page(ctx.ptep)
                if d.is_table(ctx.old, ctx.level):
                    pages.append(d.pte_pa(ctx.old))
            return 0

        self._walk_detached(table, level, cb, LEAF | TABLE_POST)
        return pages + [table]


class NotOwned(SubtreeLockCandidate):
    """Broken: the inline teardown without ownership. It reads each entry
    and puts the counted ones, but leaves them as they are, so a walker
    still inside the subtree can install behind it (the leak the RFC's
    ``stage2_unlink_pte`` closes; pages still freed after a grace period)."""

    pgtable_cls = _NotOwned


#: NotOwned reads instead of xchg-ing, so its teardown is counted in read_pte
#: points: before its eighteenth (level 1, its re-read, level 2, then each
#: entry read and re-read by the walker, entries 0-6): it has passed entry 6.
NOT_OWNED_PAST_ITS_ENTRY = _race(Preemption(0, 18, "read_pte", 1))


def test_freeing_the_table_pages_at_once_is_caught(play):
    """vCPU1 is inside the subtree (INSIDE) and vCPU0 collapses without a
    preemption: the correct candidate passes (vCPU1 then reads entry 6 as
    LOCKED and re-faults), the variant frees the level-3 table under it."""
    race = _race()
    failure, _, _ = _play(play, spying(SubtreeLockCandidate, 1), *MIGRATED, race,
                          machine="parallel")
    assert failure is None, str(failure)
    failure, _, _ = _play(play, spying(FreesAtOnce, 1), *MIGRATED, race, machine="parallel")
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "table-lifecycle", str(failure)
    assert "RCU read-side section" in failure.message or "after it was freed" in \
        failure.message, str(failure)


@pytest.mark.parametrize("cls, race", [
    (SubtreeLockCandidate, AFTER_ITS_ENTRY),
    (KvmParallelCandidate, _race()),
    (NotOwned, NOT_OWNED_PAST_ITS_ENTRY),
], ids=["subtree-lock", "kvm-parallel", "not-owned"])
def test_an_install_behind_the_teardown_leaks_unless_the_entries_are_taken(play, cls, race):
    """vCPU1 installs entry 6 after the collapsing walk has passed it. With
    the entries taken it cannot; with the merged design (kvm-parallel) the
    teardown walk runs after the grace period and sees the install; a walk
    that only reads leaves the install's reference on the table page, which
    is never freed."""
    failure, _, _ = _play(play, spying(cls, 1), *MIGRATED, race, machine="parallel")
    if cls is not NotOwned:
        assert failure is None, str(failure)
        return
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "table-lifecycle" and "leaked" in failure.message, \
        str(failure)
