"""The parallel machine (DESIGN §6): the sequential rules, plus steps in which
2–4 operations run concurrently under the deterministic scheduler.

A parallel step draws its operations (guest accesses by distinct vCPUs on the
same or neighbouring pages, notifier invalidations) and a
:class:`~conformance.platform.scheduler.Schedule` (a few preemptions) as rule
arguments, so both shrink and replay exactly. Each operation runs as a task
with its own :class:`~conformance.platform.tasks.TaskContext`; every service
call, every level of a hardware walk and every data access is a scheduling
point. When all tasks have finished, the checks that need quiescence run
(refcounts, LOCKED entries, locks, GUP references, dirty marks) and the step
must be linearizable: some order of its operations that respects real time
lets the oracle accept every observation (:mod:`.linearizability`). The
states that survive are kept (:class:`~.oracle_set.OracleSet`) and later
steps prune them.

Memslot flag changes run in parallel steps too (``memslot_race``): the
platform models SRCU for them (``Platform.set_memslot_srcu``); deletes, moves
and cache toggles stay sequential.
"""

from __future__ import annotations

import signal
import threading

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from conformance.errors import CandidateError, PropertyViolation
from conformance.findings import BLOCK_SPLIT_NO_CMO
from conformance.machines import linearizability
from conformance.machines.oracle_set import OracleSet
from conformance.machines.sequential import Stage2Machine, machine_for
from conformance.machines.steps import INDEX, checked, note
from conformance.platform.calls import CALL_TIMEOUT
from conformance.platform.scheduler import (
    Deadlock, Livelock, Preemption, Schedule, Scheduler)
from conformance.platform.tasks import TaskContext
from conformance.protocol import MemslotChange
from model.host import PAGE, THP_SIZE

#: Host operations a parallel step may run as a notifier invalidation.
NOTIFIER_OPS = ("migrate", "madvise_dontneed", "mprotect_ro")
#: The MMU notifier aging calls an ``age`` operation may make.
AGING_OPS = ("clear_flush_young", "clear_young", "test_young")
#: Point kinds a preemption may count (None: every scheduling point). The
#: stores come more often: a race is a preemption just before one, after the
#: task read the entry it is about to change.
POINT_KINDS = (None, "pte store", "pte store", "pte store", "pte store", "read_pte",
               "read_lock", "write_lock", "gup", "hw access", "tlb_flush_vmid_ipa",
               "dcache_clean_inval_poc", "put_page", "rcu_read_unlock", "host pte change",
               "mark_page_dirty", "take_dirty_bitmap")
#: Which point of that kind: early ones are where two tasks first meet.
AFTER = (1, 1, 1, 1, 2, 2, 3, 4, 6, 8, 12, 24)


@attrs.frozen
class OpSpec:
    """One operation of a parallel step, as drawn, on the step's page or the
    one after it (``neighbour``): the operations of a step meet on one 2 MiB
    window.

    ``kind`` is a guest ``read``, ``write`` or ``fetch`` by ``vcpu`` (at most
    one operation per vCPU: a vCPU already taken is replaced by the next free
    one); an ``invalidate`` (the MMU notifier of host operation ``host_op``,
    one of :data:`NOTIFIER_OPS`); an ``age`` (the aging call ``host_op``, one
    of :data:`AGING_OPS`, on the page); or a ``harvest`` (``KVM_GET_DIRTY_LOG``
    of the page's memslot, when it logs; one per step, since KVM serialises
    them with ``slots_lock``); or a ``memslot`` change that turns the page's
    memslot's dirty logging on or off (``KVM_SET_USER_MEMORY_REGION``, with
    SRCU: faults that looked the memslots up before it keep the old flags
    until it has waited for them; one per step, under ``slots_lock`` too);
    or a ``release``: the VMM process exits
    (``exit_mmap`` raises the MMU notifier ``release``) while the other
    operations run; the program ends with the step."""

    kind: str
    vcpu: int = 0
    neighbour: bool = False
    host_op: str = "migrate"
    #: An ``invalidate`` over 4 MiB around the page (an munmap or madvise of
    #: a range) instead of one page: across a 1 GiB IPA boundary where a
    #: memslot crosses one, i.e. across two chunks of a resumable unmap.
    wide: bool = False


NEIGHBOUR = st.sampled_from((False, False, False, True))
GUEST_OP = st.builds(OpSpec, kind=st.sampled_from(("read", "write", "write", "fetch")),
                     vcpu=st.integers(0, 3), neighbour=NEIGHBOUR)
INVALIDATE_OP = st.builds(OpSpec, kind=st.just("invalidate"), neighbour=NEIGHBOUR,
                          host_op=st.sampled_from(NOTIFIER_OPS),
                          wide=st.sampled_from((False, False, False, True)))
AGE_OP = st.builds(OpSpec, kind=st.just("age"), neighbour=NEIGHBOUR,
                   host_op=st.sampled_from(AGING_OPS))
HARVEST_OP = st.just(OpSpec("harvest"))
RELEASE_OP = st.just(OpSpec("release"))
#: A release ends the program's useful part: one operation in 28.
OP = st.one_of(GUEST_OP, GUEST_OP, GUEST_OP, INVALIDATE_OP, AGE_OP,
               st.one_of(HARVEST_OP, HARVEST_OP, HARVEST_OP, RELEASE_OP))
OPS = st.lists(OP, min_size=2, max_size=4).map(tuple)
PREEMPTION = st.builds(Preemption, task=st.integers(0, 3), after=st.sampled_from(AFTER),
                       kind=st.sampled_from(POINT_KINDS), to=st.integers(0, 3))
#: Shrinks to the empty schedule: each task runs until it finishes or blocks.
SCHEDULES = st.lists(PREEMPTION, max_size=4).map(lambda ps: Schedule(tuple(ps)))


def _race_schedules(kinds):
    """1-3 preemptions early in a task, at one of ``kinds``: where the
    operations of a race rule first meet."""
    preemption = st.builds(Preemption, task=st.integers(0, 3),
                           after=st.sampled_from((1, 1, 1, 2, 3)),
                           kind=st.sampled_from(kinds), to=st.integers(0, 3))
    return st.lists(preemption, min_size=1, max_size=3).map(lambda ps: Schedule(tuple(ps)))


#: Faults racing each other (seed 001: two vCPUs install on one entry; the
#: loser must see the winner's entry): preempted after reading an entry,
#: before storing, or before taking the lock.
FAULT_RACE_OPS = st.lists(st.builds(OpSpec, kind=st.sampled_from(("read", "write", "fetch")),
                                    vcpu=st.integers(0, 3),
                                    neighbour=st.sampled_from((False, False, False, True))),
                          min_size=2, max_size=3).map(tuple)
FAULT_RACE_SCHEDULES = _race_schedules(("pte store", "pte store", "read_pte", "read_lock",
                                        "gup", "rcu_read_unlock", None))


#: A fault racing a notifier invalidation (the ``mmu_invalidate_retry`` race:
#: the fault's GUP saw the old page), an aging call, a harvest or, rarely
#: (it ends the program), the process exiting. The fault is task 0 and the
#: host operation task 1; a preemption mostly stops the fault at one of the
#: points where the host operation matters and lets it run, or stops the
#: host operation half-way (between ``invalidate_range_start`` and the
#: change, after the bitmap snapshot) and lets the fault run.
HOST_OP = st.one_of(*[INVALIDATE_OP] * 4, AGE_OP, AGE_OP, HARVEST_OP, HARVEST_OP, RELEASE_OP)
HOST_RACE_OPS = st.tuples(GUEST_OP, HOST_OP).map(  # both on the same page
    lambda ops: (ops[0], attrs.evolve(ops[1], neighbour=ops[0].neighbour)))
HOST_RACE_SCHEDULES = st.lists(
    st.builds(lambda who, after, kind: Preemption(who[0], after, kind, who[1]),
              st.sampled_from(((0, 1), (0, 1), (0, 1), (1, 0))),
              st.sampled_from((1, 1, 1, 2, 3)),
              # The lock a fault takes after GUP comes first: between the two
              # is the window mmu_invalidate_retry exists for.
              st.sampled_from(("read_lock", "read_lock", "write_lock", "write_lock", "gup",
                               "pte store", "mark_page_dirty", "rcu_read_unlock",
                               "host pte change", "take_dirty_bitmap", None))),
    min_size=1, max_size=2).map(lambda ps: Schedule(tuple(ps)))

#: Guest writes racing ``KVM_GET_DIRTY_LOG`` on a logging memslot (rules
#: §4.3, §9.4 D2): the harvest runs between a write fault's GUP and its
#: install, or between the install and the dirty mark, or the fault runs
#: between the bitmap snapshot and the re-protection. The first write is
#: task 0, the harvest task 1, an optional second access task 2.
WRITE_OP = st.builds(OpSpec, kind=st.just("write"), vcpu=st.integers(0, 3), neighbour=NEIGHBOUR)
DIRTY_RACE_OPS = st.tuples(WRITE_OP, HARVEST_OP, st.lists(GUEST_OP, max_size=1)).map(
    lambda t: (t[0], t[1]) + tuple(t[2]))
DIRTY_RACE_SCHEDULES = st.lists(
    st.builds(lambda who, after, kind: Preemption(who[0], after, kind, who[1]),
              st.sampled_from(((0, 1), (0, 1), (0, 1), (1, 0), (2, 1))),
              st.sampled_from((1, 1, 1, 2)),
              st.sampled_from(("read_lock", "read_lock", "gup", "pte store",
                               "mark_page_dirty", "take_dirty_bitmap", "write_lock",
                               "rcu_read_unlock"))),
    min_size=1, max_size=2).map(lambda ps: Schedule(tuple(ps)))

#: Faults racing a collapse (rules §4.6, §7.3, §7.4; seed 001): 2-3 accesses
#: to unmapped pages of a 2 MiB window that still holds 4 KiB tables after
#: dirty logging stopped, so the first to take the fault replaces the table
#: by a block while the others are inside their walks (preempted after
#: reading an entry, before a store).
COLLAPSE_RACE_SCHEDULES = _race_schedules(("read_pte", "read_pte", "read_pte", "pte store",
                                           "pte store", "rcu_read_unlock", "put_page",
                                           "tlb_flush_vmid_ipa"))

#: Faults racing a memslot's dirty-logging flag change (rules §4.2, §4.6;
#: seed 001): a vCPU that looked up the memslots before the change keeps the
#: old flags (4 KiB while logging, a block without) while one that looked
#: them up after acts on the new ones. Task 0 is a fault, task 1 the change,
#: task 2 (and 3) faults: task 0 stopped inside its walk lets the change
#: publish and wait for it (``synchronize_srcu``), and task 2 runs next with
#: the new memslots.
MEMSLOT_OP = st.just(OpSpec("memslot"))
MEMSLOT_RACE_OPS = st.tuples(GUEST_OP, MEMSLOT_OP, st.lists(GUEST_OP, min_size=1, max_size=2)).map(
    lambda t: (t[0], t[1]) + tuple(t[2]))
def _first_preemption(points):
    """Task 0 stopped at one of ``points`` ((kind, after) pairs), in favour
    of task 1: where the race of a rule begins."""
    return st.sampled_from(points).map(lambda p: Preemption(0, p[1], p[0], 1))


MEMSLOT_RACE_SCHEDULES = st.tuples(
    # The first fault stopped once it has looked the memslots up and read the
    # entry it changes (after its first store: it holds the entry LOCKED),
    # in favour of the change.
    _first_preemption((("pte store", 1), ("pte store", 1), ("pte store", 1),
                       ("pte store", 2), ("read_pte", 3), ("gup", 1))),
    st.lists(st.builds(lambda who, after, kind: Preemption(who[0], after, kind, who[1]),
                       st.sampled_from(((1, 2), (2, 0), (0, 2))),
                       st.sampled_from((1, 1, 2, 3)),
                       st.sampled_from(("memslot swap", "pte store", "read_pte", "read_lock"))),
             max_size=1)).map(lambda t: Schedule((t[0],) + tuple(t[1])))

#: A notifier invalidation of a range (across a 1 GiB IPA boundary where a
#: memslot crosses one, so a resumable unmap drops ``mmu_lock`` half-way)
#: racing the VMM's exit or a guest access (rules §5.3, §9.7 L4; seed 002).
WIDE_INVALIDATE_OP = st.builds(OpSpec, kind=st.just("invalidate"), wide=st.just(True),
                               host_op=st.sampled_from(("madvise_dontneed", "mprotect_ro")))
UNMAP_RACE_OPS = st.tuples(WIDE_INVALIDATE_OP, st.one_of(GUEST_OP, RELEASE_OP),
                           st.lists(GUEST_OP, max_size=1)).map(
    lambda t: (t[0], t[1]) + tuple(t[2]))
UNMAP_RACE_SCHEDULES = st.lists(
    st.builds(lambda who, after, kind: Preemption(who[0], after, kind, who[1]),
              st.sampled_from(((0, 1), (0, 1), (1, 0), (0, 2), (2, 0))),
              st.sampled_from((1, 1, 2, 3)),
              st.sampled_from(("pte store", "write_lock", "read_lock", "put_page",
                               "tlb_flush_vmid_ipa", "read_pte", None))),
    max_size=2).map(lambda ps: Schedule(tuple(ps)))

#: Faults racing to upgrade one leaf (rules §2.5 relax_perms and map step 3,
#: §7.2, §7.5, §9.3 T4/T7; seed 000; §8 bug 14): 2-3 writes or fetches by
#: different vCPUs on a page mapped without that permission (one relaxes,
#: the others lose their ``cmpxchg`` or find the work done), sometimes after
#: a read fault that went stale while they mapped the page with more
#: permissions. Task 0 is stopped before its store or its walk, in favour of
#: task 1.
def _relax_ops(stale_read, kind, vcpus):
    ops = tuple(OpSpec(kind, vcpu=v) for v in vcpus)
    return ((OpSpec("read", vcpu=3),) + ops) if stale_read else ops


RELAX_RACE_OPS = st.builds(_relax_ops, st.sampled_from((False, False, True)),
                           st.sampled_from(("fetch", "write", "fetch")),
                           st.lists(st.integers(0, 3), min_size=2, max_size=2))
#: What comes first: vCPU0 reads the page (a read maps it XN without DIC,
#: read-only while logging), or the host migrates it (so every access is a
#: translation fault), or nothing (a page mapped without the permission is
#: chosen if there is one).
RELAX_BEFORE = st.sampled_from(("read", "migrate", "read", "nothing"))
RELAX_RACE_SCHEDULES = st.tuples(
    # The first fault stopped before its store (a lost cmpxchg) or before its
    # walk (a stale fault), in favour of the second.
    _first_preemption((("pte store", 1), ("pte store", 1), ("pte store", 1),
                       ("read_lock", 1), ("gup", 1), ("pte store", 2))),
    st.lists(st.builds(lambda who, after, kind: Preemption(who[0], after, kind, who[1]),
                       st.sampled_from(((1, 0), (0, 2), (1, 2), (2, 0))),
                       st.sampled_from((1, 1, 2)),
                       st.sampled_from(("pte store", "read_lock", "read_pte",
                                        "tlb_flush_vmid_ipa_nsh"))),
             max_size=1)).map(lambda t: Schedule((t[0],) + tuple(t[1])))

#: The rules whose steps run concurrently (same arguments, same checks).
PARALLEL_RULES = ("parallel", "fault_race", "host_race", "dirty_race", "collapse_race",
                  "memslot_race", "unmap_race", "relax_race")


@attrs.frozen
class _Planned:
    label: str
    run: object      # () -> observation, on the platform
    apply: object    # (oracle, observation) -> bool
    #: A guest write's gfn (a harvest running meanwhile may miss its mark).
    writes: int | None = None
    #: (oracle, observation, gfns written concurrently) -> bool, for a
    #: harvest: its verdict depends on the writes that overlapped it.
    apply_harvest: object = None


class ParallelMachine(Stage2Machine):
    """Subclassed per candidate by :func:`parallel_machine_for`."""

    kind = "parallel"
    layouts_cross_1g = True

    def __init__(self):
        super().__init__()
        #: The realized interleaving of every parallel step so far, as text
        #: (``Event.describe()``): what a replay must reproduce exactly.
        self.interleavings: list[tuple[str, ...]] = []
        self._drops_used: set[int] = set()

    def _boot(self, config, layout):
        super()._boot(config, layout)
        self.oracle = OracleSet([self.oracle])

    # ``refault``: the host migrates the page first (NUMA balancing,
    # compaction), so the vCPUs fault on it together: the race the seeds are
    # about. Drawn independently, concurrent faults on one unmapped page are
    # about one parallel step in ten.
    @precondition(lambda self: self.live)
    @rule(where=INDEX, ops=OPS, schedule=SCHEDULES, refault=st.booleans())
    @checked
    def parallel(self, where, ops, schedule, refault=False):
        """Run ``ops`` concurrently, on the page at ``where`` and the next,
        under ``schedule`` (after migrating the page, with ``refault``); then
        quiescence checks and linearizability."""
        self._parallel_step(self._gfn(where), ops, schedule, refault)

    # The two race rules are parallel steps drawn where races are: faults
    # on one page the host has just migrated, and a fault against a host
    # operation, each with at least one early preemption. As rules of their
    # own they also make parallel steps more frequent (332 of 2,301 ci steps
    # of kvm-classic, against 148 with the one rule).
    @precondition(lambda self: self.live)
    @rule(where=INDEX, ops=FAULT_RACE_OPS, schedule=FAULT_RACE_SCHEDULES,
          refault=st.sampled_from((True, True, False)))
    @checked
    def fault_race(self, where, ops, schedule, refault=True):
        """Guest accesses by 2-3 vCPUs racing on the page at ``where`` (or
        the next), mostly after the host migrated it (so they fault
        together); otherwise on whatever is mapped (permission and
        access-flag faults, a collapse after dirty logging stopped)."""
        self._parallel_step(self._gfn(where), ops, schedule, refault)

    @precondition(lambda self: self.live)
    @rule(where=INDEX, ops=HOST_RACE_OPS, schedule=HOST_RACE_SCHEDULES, refault=st.booleans())
    @checked
    def host_race(self, where, ops, schedule, refault=False):
        """A guest access racing a notifier invalidation, an aging call, a
        dirty-log harvest or the VMM's exit on the page at ``where`` (or the
        next)."""
        self._parallel_step(self._gfn(where), ops, schedule, refault)

    @precondition(lambda self: self.live and any(s.is_logging for s in self.slots.values()))
    @rule(where=INDEX, ops=DIRTY_RACE_OPS, schedule=DIRTY_RACE_SCHEDULES,
          refault=st.booleans())
    @checked
    def dirty_race(self, where, ops, schedule, refault=False):
        """Guest writes racing ``KVM_GET_DIRTY_LOG`` on a page at ``where`` of a
        logging memslot (or the next page), after the host migrated it with
        ``refault`` (so the write faults and pins a page)."""
        self._parallel_step(self._gfn_where(where, lambda s: s.is_logging), ops, schedule,
                            refault)

    # Only while there is something to collapse: any access to such a
    # window collapses it, so it lasts a few steps.
    @precondition(lambda self: self.live and self._has_table_window(logging=False))
    @rule(where=INDEX, ops=FAULT_RACE_OPS, schedule=COLLAPSE_RACE_SCHEDULES)
    @checked
    def collapse_race(self, where, ops, schedule):
        """Guest accesses by 2-3 vCPUs to an unmapped page (and the next) of a
        2 MiB window still mapped by 4 KiB tables in a memslot that does not
        log, so that one fault collapses the table while the others walk it
        (when no window is so, on the page at ``where``)."""
        gfn = self._table_window_gfn(where, logging=False) or self._gfn(where)
        self._parallel_step(gfn, ops, schedule, False)

    @precondition(lambda self: self.live)
    @rule(where=INDEX, ops=MEMSLOT_RACE_OPS, schedule=MEMSLOT_RACE_SCHEDULES)
    @checked
    def memslot_race(self, where, ops, schedule):
        """Dirty logging of a memslot turned on or off (whichever it is not)
        while 2-3 vCPUs fault on a page of it and the next: an unmapped page
        of a window with a 4 KiB table in a logging memslot if there is one
        (turning logging off lets a fault collapse the table while a fault
        from before the change maps a page in it), else the page at
        ``where``."""
        gfn = self._table_window_gfn(where, logging=True) or self._gfn(where)
        self._parallel_step(gfn, ops, schedule, False)

    @precondition(lambda self: self.live)
    @rule(where=INDEX, ops=UNMAP_RACE_OPS, schedule=UNMAP_RACE_SCHEDULES)
    @checked
    def unmap_race(self, where, ops, schedule):
        """A notifier invalidation of 4 MiB around the page at ``where`` of a
        memslot that crosses a 1 GiB IPA boundary (of any memslot if none
        does) racing the VMM's exit or guest accesses."""
        self._parallel_step(self._gfn_where(where, _crosses_1g), ops, schedule, False)

    @precondition(lambda self: self.live)
    @rule(where=INDEX, ops=RELAX_RACE_OPS, schedule=RELAX_RACE_SCHEDULES, before=RELAX_BEFORE)
    @checked
    def relax_race(self, where, ops, schedule, before="nothing"):
        """Writes or fetches by 2-3 vCPUs on one page: the page at ``where``
        (of a logging memslot, for writes) after vCPU0 read it
        (``before="read"``), or after the host migrated it (``"migrate"``),
        else a page mapped without the permission they need (the page at
        ``where`` if there is none)."""
        write = ops[-1].kind == "write"
        if before == "nothing":
            gfn = self._upgradable_gfn(where, write) or self._gfn(where)
        elif before == "read" and write:  # read-only only while logging
            gfn = self._gfn_where(where, lambda slot: slot.is_logging)
        else:
            gfn = self._gfn(where)
        if before == "read":
            self._guest_access_gfn(0, gfn, "read")
        self._parallel_step(gfn, ops, schedule, before == "migrate")

    def _upgradable_gfn(self, where, write: bool) -> int | None:
        """A page of a writable memslot mapped by a leaf without W (``write``)
        or without X: what the last access of a ``relax_race`` upgrades
        (``None`` if there is none)."""
        pages = []
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            if slot.readonly:
                continue
            for step, leaf in self.platform.leaves(slot.base_gfn << 12, slot.end_gfn << 12):
                gfn = max(step.ipa >> 12, slot.base_gfn)
                if not (leaf.write if write else leaf.exec):
                    pages.append(gfn)
        return pages[where % len(pages)] if pages else None

    def _gfn_where(self, where, wanted) -> int:
        """The gfn of the pool entry ``where`` among those in a memslot that
        is ``wanted`` (any entry if none is)."""
        pool = [i for i, (sid, _) in enumerate(self.gfns)
                if sid in self.slots and wanted(self.slots[sid])] or list(range(len(self.gfns)))
        return self._gfn(pool[where % len(pool)])

    @staticmethod
    def _congruent(slot) -> bool:
        """Is the slot's hva congruent to its IPA modulo 2 MiB (rules §3.3),
        so that its windows may be mapped by blocks?"""
        return (slot.userspace_addr - (slot.base_gfn << 12)) % THP_SIZE == 0

    def _has_table_window(self, logging: bool) -> bool:
        """Is a table of 4 KiB entries linked in a block-capable memslot whose
        logging is ``logging``, in a window the host may back with a THP?
        (Cheap: the platform's reachable tables.)"""
        for ipa, level in self.platform.reachable.values():
            if level == 3:
                gfn = ipa >> 12
                slot = self.platform.slot_for_gfn(gfn)
                if slot is not None and slot.is_logging == logging \
                        and self._congruent(slot) and gfn + 511 < slot.end_gfn \
                        and self._host_may_back_a_block(slot.gfn_to_hva(gfn)):
                    return True
        return False

    def _host_may_back_a_block(self, hva) -> bool:
        """Is the 2 MiB window at ``hva`` a THP on the host, or not faulted
        in yet where a THP fits (a fault there may then map a block)?"""
        host = self.platform.host
        pte = host.pte(hva)
        return pte.huge if pte is not None else host.thp_possible(hva)

    def _table_window_gfn(self, where, logging: bool) -> int | None:
        """An unmapped page (with an unmapped next page; a mapped one if the
        window has none) of a 2 MiB window mapped by a table of 4 KiB leaves,
        in a block-capable memslot whose logging is ``logging``: where a
        fault without logging collapses the table (``None`` if there is
        none)."""
        p, pages = self.platform, []
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            if slot.is_logging != logging or not self._congruent(slot):
                continue
            first = -(-slot.base_gfn // 512) * 512
            for window in range(first, slot.end_gfn - 511, 512):
                if not self._host_may_back_a_block(slot.gfn_to_hva(window)):
                    continue
                leaves = p.leaves(window << 12, (window + 512) << 12)
                if not any(step.level == 3 for step, _ in leaves):
                    continue
                mapped = {step.ipa >> 12 for step, _ in leaves}
                free = [window + off for off in (1, 0, 5, 256, 510)
                        if window + off not in mapped and window + off + 1 not in mapped]
                # A fully mapped window collapses on a permission fault too
                # (the fault granule is smaller than the host mapping).
                pages.extend(free or [window + 1, window + 256])
        return pages[where % len(pages)] if pages else None

    def _parallel_step(self, gfn, ops, schedule, refault):
        if refault:
            self._migrate(gfn)
        planned = self._plan(gfn, ops)
        if len(planned) < 2:
            self.interleavings.append(())  # one entry per parallel step
            for op in planned:  # a lone operation runs sequentially
                self._linearize([self._run_alone(op)])
            return
        p = self.platform
        sched = Scheduler(_fit(schedule, len(planned)))
        records: list[linearizability.Op] = []
        for i, op in enumerate(planned):
            sched.spawn(self._task(sched, i, op, records), name=op.label)
        p.scheduler, main = sched, p.ctx
        p.mmu_lock.scheduler = p.rcu.scheduler = sched
        try:
            self._run_watched(sched)
        except (Deadlock, Livelock) as exc:
            raise PropertyViolation(
                "forward-progress", f"parallel step: {type(exc).__name__.lower()}: {exc}",
                step=p.step) from None
        finally:
            p.scheduler, p.ctx, p.task_ctx = None, main, {}
            p.mmu_lock.scheduler = p.rcu.scheduler = None
            self.interleavings.append(tuple(e.describe() for e in sched.trace))
        self._event(f"parallel: {len(planned)} ops")
        stats = sched.statistics()
        if stats.preemptions_fired:
            self._event("parallel: a preemption fired")
        self._count(stats)
        p.quiesce("parallel step")
        self._linearize(_bind_in_flight(sorted(records, key=lambda r: r.index), planned))

    def _known_drop(self, hva) -> bool:
        """Is ``hva`` a page of the known finding block-split-no-cmo, on a
        candidate that declares it (an unexpected value there is counted, not
        failed; see ``Stage2Machine._known_finding``)? Only looks: the
        linearizability search may ask many times; :meth:`_take_drops` counts
        once the step has passed."""
        if hva is None or BLOCK_SPLIT_NO_CMO.id not in self.known_findings \
                or hva not in self.platform.drops.pages:
            return False
        self._drops_used.add(hva)
        return True

    def _take_drops(self) -> None:
        for hva in sorted(self._drops_used):
            if self.platform.drops.take(hva):
                self.platform.counters[f"known finding: {BLOCK_SPLIT_NO_CMO.id}"] += 1
                self._event(f"known finding: {BLOCK_SPLIT_NO_CMO.id}")
        self._drops_used.clear()

    def _count(self, stats) -> None:
        """Cost counters of the step's scheduling (the matrix shows them)."""
        c = self.platform.counters
        c["parallel steps"] += 1
        c["scheduling points"] += sum(stats.points)
        c["scheduling decisions"] += stats.decisions
        c["lock waits"] += stats.blocked_waits
        c["preemptions fired"] += stats.preemptions_fired

    def _run_alone(self, op) -> linearizability.Op:
        got = op.run()
        return linearizability.Op(index=0, label=op.label, call=0, ret=1, observation=got,
                                  apply=op.apply)

    def _migrate(self, gfn) -> None:
        """Migrate the page (or THP) at ``gfn``, sequentially, as the
        ``host_mm`` rule does: the notifier unmaps it at stage 2."""
        slot = self.platform.slot_for_gfn(gfn)
        hva = None if slot is None else slot.gfn_to_hva(gfn)
        pte = None if hva is None else self.platform.host.pte(hva)
        if pte is None:
            return
        size = THP_SIZE if pte.huge else PAGE
        start = hva & ~(size - 1)
        self.platform.host_op("migrate", start, start + size)
        self.oracle.host_op("migrate", start, start + size)

    # ------------------------------------------------------------ planning
    def _plan(self, base_gfn, ops) -> list[_Planned]:
        used, out = set(), []
        nr_vcpus = self.platform.config.nr_vcpus
        for spec in ops:
            gfn = base_gfn + (1 if spec.neighbour else 0)
            if spec.kind in ("read", "write", "fetch"):
                # At most one operation per vCPU: the next free one after
                # the drawn one (so vcpu=0 shrinks to "the first free").
                free = [v for v in range(nr_vcpus) if v not in used]
                if not free:
                    continue
                vcpu = min(free, key=lambda v: (v - self._vcpu(spec.vcpu)) % nr_vcpus)
                used.add(vcpu)
                planned = self._plan_guest(spec, vcpu, gfn)
            elif spec.kind in ("harvest", "release", "memslot") and spec.kind in used:
                continue  # KVM_GET_DIRTY_LOG runs under slots_lock; one exit
            else:
                used.add(spec.kind)
                planned = getattr(self, f"_plan_{spec.kind}")(spec, gfn)
            if planned is not None:
                out.append(planned)
        return out

    def _plan_guest(self, spec, vcpu, gfn) -> _Planned:
        kind = spec.kind if spec.kind != "fetch" else "exec"
        if kind == "exec" and self.oracle.slot_for_gfn(gfn) is None:
            kind = "read"  # fetches from MMIO inject aborts: not modelled
        value = self._value(f"guest write by vCPU{vcpu}") if kind == "write" else None
        p = self.platform

        def run():
            return p.guest_access(vcpu, gfn << 12, kind, value)

        slot = self.oracle.slot_for_gfn(gfn)
        hva = None if slot is None else slot.gfn_to_hva(gfn)

        def apply(oracle, got):
            if got in oracle.guest_access(vcpu, gfn, kind, value, observed=got):
                return True
            if got.exit is None and self._known_drop(hva):
                oracle.adopt_stale_line(hva, got.value)  # as the sequential machine does
                return got in oracle.guest_access(vcpu, gfn, kind, value, observed=got)
            return False

        what = f" = {value}" if value is not None else ""
        return _Planned(f"vCPU{vcpu} {kind} gfn {gfn:#x}{what}", run, apply,
                        writes=gfn if kind == "write" else None)

    def _plan_invalidate(self, spec, gfn) -> _Planned | None:
        slot = self.platform.slot_for_gfn(gfn)
        if slot is None:
            return None
        hva = slot.gfn_to_hva(gfn)
        host, op = self.platform.host, spec.host_op
        pte = host.pte(hva)
        if host.vma_at(hva) is None or (op == "migrate" and pte is None):
            return None
        start, end = hva, hva + PAGE
        if spec.wide:  # 2 MiB either side of the window: clipped to the VMA
            vma = host.vma_at(hva)
            start = max(vma.start, (hva & ~(THP_SIZE - 1)) - THP_SIZE)
            end = min(vma.end, start + 2 * THP_SIZE)
        elif op == "migrate" and pte.huge:  # a THP migrates whole
            start = hva & ~(THP_SIZE - 1)
            end = start + THP_SIZE
            if host.vma_at(end - PAGE) is None:
                return None
        # Otherwise a THP the page belongs to is split first, inside the same
        # task (split_huge_pmd raises its own notifier over the whole PMD).
        p = self.platform

        def run():
            p.host_op(op, start, end)

        def apply(oracle, _observed):
            oracle.host_op(op, start, end)
            return True

        return _Planned(f"notifier {op} hva {start:#x}-{end:#x}", run, apply)

    def _plan_age(self, spec, gfn) -> _Planned | None:
        slot = self.platform.slot_for_gfn(gfn)
        if slot is None:
            return None
        hva, p = slot.gfn_to_hva(gfn), self.platform

        def run():
            p.aging(spec.host_op, hva, hva + PAGE)

        # Judged by its monitor (what it may store, what it returns), not
        # by the oracle: stage 2's AF is not guest-visible state here.
        return _Planned(f"{spec.host_op} hva {hva:#x}", run, lambda oracle, _got: True)

    def _plan_release(self, spec, gfn) -> _Planned | None:
        p = self.platform

        def apply(oracle, _observed):
            oracle.release()
            return True

        return _Planned("exit_mmap (notifier release)", p.exit_mmap, apply)

    def _plan_memslot(self, spec, gfn) -> _Planned | None:
        old = self.platform.slot_for_gfn(gfn)
        if old is None:
            return None
        new = attrs.evolve(old, log_dirty_pages=not old.log_dirty_pages)
        self.slots[new.id] = new  # the machine's view once the step is over
        p = self.platform

        def run():
            p.set_memslot_srcu(old, new, MemslotChange.FLAGS_ONLY)

        def apply(oracle, _observed):
            oracle.set_memslot(old, new)
            return True

        self._event(f"parallel: dirty logging {'on' if new.log_dirty_pages else 'off'}")
        return _Planned(f"memslot {old.id} dirty logging "
                        f"{'on' if new.log_dirty_pages else 'off'}", run, apply)

    def _plan_harvest(self, spec, gfn) -> _Planned | None:
        slot = self.platform.slot_for_gfn(gfn)
        if slot is None or not slot.is_logging:
            return None
        p = self.platform

        def run():
            return p.get_dirty_log(slot)

        def apply_harvest(oracle, reported, in_flight):
            missing, _extra = oracle.harvest(slot, reported, in_flight)
            return not missing

        return _Planned(f"get_dirty_log slot {slot.id}", run,
                        lambda oracle, reported: apply_harvest(oracle, reported, frozenset()),
                        apply_harvest=apply_harvest)

    # ------------------------------------------------------------- running
    def _task(self, sched, index, op, records):
        p = self.platform

        def body():
            ctx = TaskContext(name=op.label)
            p.task_ctx[sched.current] = ctx
            p.ctx = ctx
            call = sched.statistics().decisions
            got = op.run()
            records.append(linearizability.Op(
                index=index, label=op.label, call=call,
                ret=sched.statistics().decisions, observation=got, apply=op.apply))
        return body

    def _run_watched(self, sched) -> None:
        """One watchdog for the whole step (not one alarm per call)."""
        if not (hasattr(signal, "setitimer")
                and threading.current_thread() is threading.main_thread()):
            sched.run()
            return

        def on_alarm(signum, frame):
            raise CandidateError("timeout", f"a parallel step did not finish within "
                                 f"{CALL_TIMEOUT:g}s", step=self.platform.step)
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, CALL_TIMEOUT)
        try:
            sched.run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    # ------------------------------------------------------------ checking
    def _linearize(self, records) -> None:
        result = linearizability.check(self.oracle.states, records)
        if result.status == "pass":
            self._take_drops()
            self.oracle = OracleSet(result.survivors)
            if len(self.oracle) > 1:
                self._event("parallel: several oracle states survive")
            return
        orders = "; ".join(" -> ".join(records[i].label for i in order) or "(none)"
                           for order in result.orders[:3])
        seen = "; ".join(f"{r.label}: {self._describe(r.observation)}" for r in records)
        if result.status == "unknown":
            note(f"linearizability search gave up after {result.explored} configurations")
            raise PropertyViolation(
                "guest-observation", f"parallel step: no verdict within the search budget "
                f"({result.explored} configurations); observations: {seen}",
                step=self.platform.step)
        raise PropertyViolation(
            "guest-observation", f"parallel step: no order of the operations that respects "
            f"real time explains what they observed ({seen}); longest consistent "
            f"prefixes: {orders}", step=self.platform.step)

    def _describe(self, observation) -> str:
        if observation is None:
            return "done"
        if isinstance(observation, frozenset):  # a harvest's reported gfns
            shown = ", ".join(f"{g:#x}" for g in sorted(observation)[:6])
            return f"reported {{{shown}{', ...' if len(observation) > 6 else ''}}}"
        return self._explain(observation)


def _crosses_1g(slot) -> bool:
    """Does the memslot span two 1 GiB IPA regions (two level-1 entries, two
    chunks of ``stage2_apply_range``)?"""
    return slot.base_gfn >> 18 != (slot.end_gfn - 1) >> 18


def _bind_in_flight(records, planned):
    """A harvest's verdict with the gfns of the guest writes that overlapped
    it in real time (either may come first; the write's dirty mark may land
    after the harvest even if the write is placed before it)."""
    out = []
    for r in records:
        op = planned[r.index]
        if op.apply_harvest is not None:
            in_flight = frozenset(planned[w.index].writes for w in records
                                  if planned[w.index].writes is not None
                                  and w.call < r.ret and r.call < w.ret)
            r = attrs.evolve(r, apply=lambda oracle, got, f=op.apply_harvest, i=in_flight:
                             f(oracle, got, i))
        out.append(r)
    return out


def _fit(schedule: Schedule, n: int) -> Schedule:
    """The schedule for ``n`` tasks: task ids modulo ``n``, and a preemption
    to the task itself goes to the next one instead (drawn independently of
    how many operations the step keeps, so it shrinks independently too)."""
    fitted = []
    for p in schedule.preemptions:
        task, to = p.task % n, p.to % n
        if to == task:
            to = (task + 1) % n
        fitted.append(attrs.evolve(p, task=task, to=to))
    return Schedule(tuple(fitted))


def parallel_machine_for(name: str, candidate_cls: type,
                         class_name: str | None = None) -> type[ParallelMachine]:
    """The parallel machine bound to one candidate (see ``machine_for``)."""
    safe = class_name or "ParallelMachine_" + "".join(c if c.isalnum() else "_" for c in name)
    return machine_for(name, candidate_cls, class_name=safe, base=ParallelMachine,
                       min_vcpus=2)


#: The machines a candidate can be run against.
MACHINES = ("sequential", "parallel")


def machine_class(name: str, candidate_cls: type, machine: str = "sequential",
                  class_name: str | None = None):
    """The machine class of kind ``machine`` bound to ``candidate_cls``."""
    if machine == "sequential":
        return machine_for(name, candidate_cls, class_name=class_name)
    if machine == "parallel":
        caps = getattr(candidate_cls, "capabilities", None)
        if not getattr(caps, "concurrent", False):
            raise ValueError(f"candidate {name!r} does not declare "
                             "Capabilities(concurrent=True): the parallel machine runs "
                             "its operations concurrently (docs/candidate-protocol.md)")
        return parallel_machine_for(name, candidate_cls,
                                    class_name=class_name and class_name + "_parallel")
    raise ValueError(f"unknown machine {machine!r}; known: {', '.join(MACHINES)}")


