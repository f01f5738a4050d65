"""The parallel machine (docs/parallel.md): per-task contexts, scheduling
points in the platform, the oracle-set bookkeeping, and a race it must see."""

from __future__ import annotations

import attrs
import pytest

from candidates.classic import ClassicCandidate
from candidates.mutants.classic_mutants import PlainStoreInSharedWalk
from candidates.reference import ReferenceCandidate
from conformance.errors import PropertyViolation
from conformance.failures.polish import play
from conformance.machines.parallel import OpSpec, machine_class
from conformance.platform.scheduler import Preemption, Schedule
from conformance.protocol import Memslot, VmConfig
from model.oracle import Outcome
from strategies.layouts import Layout, Vma

HVA = 0x4000_0000
#: Two vCPUs, no FWB, hardware AF; a cold, THP-backed 2 MiB slot (where=0 is
#: gfn 0x40000, its neighbour 0x40001).
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=True, nr_vcpus=2)
LAYOUT = Layout((Memslot(0, 0x40000, 512, HVA),), (Vma(HVA, HVA + (512 << 12), True),),
                "cold", False)
BOOT = ("boot", dict(config=CONFIG, layout=LAYOUT))
#: vCPU0 and vCPU1 fault on the same unmapped page at once.
RACE = (OpSpec("read", 0), OpSpec("write", 1))
#: Task 0 is preempted just before its first PTE store: it has read the
#: (empty) entry, task 1 then maps the page, and task 0 resumes.
BEFORE_FIRST_STORE = Schedule((Preemption(0, 1, "pte store", 1),))


def _parallel(ops=RACE, schedule=BEFORE_FIRST_STORE, where=0):
    return ("parallel", dict(where=where, ops=ops, schedule=schedule))


def _play(cls, *steps):
    return play("scripted", cls, [BOOT, *steps], "parallel")


@pytest.mark.parametrize("cls", [ClassicCandidate, ReferenceCandidate],
                         ids=["kvm-classic", "reference"])
def test_correct_candidates_pass_the_race(cls, play):
    failure, machine = _play(cls, _parallel())
    assert failure is None, str(failure)
    assert "parallel: a preemption fired" in machine.events


def test_a_plain_store_in_the_shared_fault_path_is_caught():
    """The locking monitor sees the plain store to a live entry under the
    read lock, with or without the race."""
    for schedule in (BEFORE_FIRST_STORE, Schedule(())):
        failure, _ = _play(PlainStoreInSharedWalk, _parallel(schedule=schedule))
        assert isinstance(failure, PropertyViolation) and failure.property == "locking", failure


def test_without_the_locking_monitor_the_race_still_shows(monkeypatch):
    """Without the monitor, the damage shows only when the race happens:
    the empty schedule runs the faults one after the other and the plain
    store is harmless, which is why shrinking keeps the one preemption."""
    from conformance.platform.monitors import Monitors

    monkeypatch.setattr(Monitors, "plain_store_violation", lambda self, ptep: None)
    failure, _ = _play(PlainStoreInSharedWalk, _parallel(schedule=Schedule(())))
    assert failure is None, str(failure)
    failure, _ = _play(PlainStoreInSharedWalk, _parallel())
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property in ("refcount", "table-lifecycle", "break-before-make"), failure


def test_replaying_a_parallel_step_gives_the_same_interleaving():
    traces = []
    for _ in range(3):
        failure, machine = _play(ClassicCandidate, _parallel())
        assert failure is None
        traces.append(machine.interleavings)
    assert traces[0] and traces[0] == traces[1] == traces[2]


def test_two_concurrent_writes_leave_both_values_until_a_read_decides():
    """Linearizability keeps both orders (two oracle states); a sequential read
    of either value is accepted and prunes the set to one. (Task 0 is
    preempted at its first point, so the two writes overlap in real time.)"""
    writes = (OpSpec("write", 0), OpSpec("write", 1))
    overlap = Schedule((Preemption(0, 1, None, 1),))
    failure, machine = _play(ClassicCandidate, ("guest_read", dict(vcpu=0, where=0,
                                                                         pages=1)),
                             _parallel(writes, overlap))
    assert failure is None, str(failure)
    assert len(machine.oracle) == 2
    gfn = 0x40000
    a, b = sorted(machine.next_value - i for i in (1, 0))
    allowed = machine.oracle.guest_access(0, gfn, "read", None, observed=Outcome(value=b))
    assert {Outcome(value=a), Outcome(value=b)} <= allowed
    assert len(machine.oracle) == 1


def test_a_non_linearizable_observation_fails(monkeypatch):
    """A read that sees a value nobody wrote cannot be placed in any order."""
    from conformance.platform import mmu

    real = mmu.Mmu._perform

    def lying(self, vcpu, ipa, entry, kind, value):
        got = real(self, vcpu, ipa, entry, kind, value)
        return Outcome(value=12345) if kind == "read" and self.scheduler else got

    monkeypatch.setattr(mmu.Mmu, "_perform", lying)
    failure, _ = _play(ClassicCandidate, ("guest_read", dict(vcpu=0, where=0, pages=1)),
                       _parallel((OpSpec("read", 0), OpSpec("write", 1)), Schedule(())))
    assert isinstance(failure, PropertyViolation) and failure.property == "guest-observation"
    assert "no order of the operations" in failure.message


def test_the_parallel_machine_needs_a_concurrent_candidate():
    from candidates.common import KvmBase

    with pytest.raises(ValueError, match="concurrent=True"):
        machine_class("plain", KvmBase, "parallel")


def test_a_parallel_step_restores_the_sequential_context():
    failure, machine = _play(ClassicCandidate, _parallel())
    assert failure is None
    p = machine.platform
    assert p.scheduler is None and p.task_ctx == {} and p.ctx.name == "main"
    assert p.mmu_lock.scheduler is None and p.rcu.scheduler is None


def test_a_write_through_a_leaf_another_fault_is_still_installing_is_legal():
    """Found by ``run --machine parallel --profile thorough`` on kvm-classic:
    vCPU0's write fault has installed a writable leaf in a logging slot and
    not yet marked the page dirty (it will, before it returns: rules §9.4 D2
    (ii)); vCPU1 writes through the new leaf meanwhile. The dirty-mark
    obligation is checked when the step quiesces, not at vCPU1's access."""
    logging = Layout((Memslot(0, 0x40000, 1024, HVA, log_dirty_pages=True),),
                     (Vma(HVA, HVA + (1024 << 12) + (2 << 20), True),), "cold", False)
    config = VmConfig(ipa_bits=32, fwb=False, hw_af=False, nr_vcpus=2)
    ops = (OpSpec("write", 0, neighbour=True), OpSpec("write", 1, neighbour=True))
    step = _parallel(ops, Schedule((Preemption(0, 4, "read_pte", 1),)))
    failure, machine = play("scripted", ClassicCandidate,
                            [("boot", dict(config=config, layout=logging)), step], "parallel")
    assert failure is None, str(failure)
    assert "parallel: a preemption fired" in machine.events


def test_the_report_shows_the_failing_steps_interleaving_and_replay_repeats_it(monkeypatch):
    """The replay document records every parallel step's realized interleaving;
    the report of a failure inside a parallel step shows that step's, and a
    replay of the document realizes the same interleaving again."""
    from conformance.failures import document, report
    from conformance.failures.replay import replay_machine
    from conformance.platform import mmu

    real = mmu.Mmu._perform

    def lying(self, vcpu, ipa, entry, kind, value):
        got = real(self, vcpu, ipa, entry, kind, value)
        return Outcome(value=12345) if kind == "read" and self.scheduler else got

    monkeypatch.setattr(mmu.Mmu, "_perform", lying)
    failure, machine = _play(ClassicCandidate, _parallel())
    assert failure is not None and failure.step.startswith("2: parallel(")
    doc = document.replay_document("scripted", ClassicCandidate, failure, machine.calls,
                                   machine.trace, {}, machine=machine)
    assert doc["format"] == 3 and doc["machine"] == "parallel"
    assert doc["interleavings"] == [list(machine.interleavings[0])]
    text = report.text(report.from_doc(doc))
    assert "interleaving of parallel step 2, the failing step (one column per task" in text
    header = next(line for line in text.splitlines() if "task 0: vCPU0 read" in line)
    assert "task 1: vCPU1 write" in header  # one column per task, headed by its operation
    assert ">> to task 1 (preemption #0)" in text
    markdown = report.markdown(report.from_doc(doc))
    assert "| # | task 0: vCPU0 read gfn 0x40000 | task 1: vCPU1 write gfn 0x40000" in markdown
    assert "decision 11: task 0 to task 1 (preemption #0)" in markdown
    encoded = document.decode(document.encode(doc))  # as a file would round-trip it
    _result, _again, out = replay_machine(encoded, ClassicCandidate, candidate="scripted")
    assert out["interleavings"] == doc["interleavings"]


def test_step_deletion_also_simplifies_inside_a_parallel_step():
    """Redundant preemptions and operations of a failing parallel step go,
    and a late preemption moves to the first point of its kind."""
    from conformance.failures.polish import delete_steps

    noisy = _parallel(ops=(OpSpec("read", 0), OpSpec("write", 1), OpSpec("invalidate", 0,
                                                                        host_op="mprotect_ro")),
                      schedule=Schedule((Preemption(0, 1, "pte store", 1),
                                         Preemption(1, 24, "read_lock", 0))))
    calls = [BOOT, ("guest_cache_control", dict(vcpu=1, op="caches on")), noisy]
    failure, _ = play("scripted", PlainStoreInSharedWalk, calls, "parallel")
    assert failure is not None
    polished = delete_steps("scripted", PlainStoreInSharedWalk, calls, failure,
                            machine="parallel")
    assert polished is not None
    steps = [rule for rule, _ in polished.calls]
    assert steps == ["boot", "parallel"]
    args = polished.calls[1][1]
    assert len(args["schedule"].preemptions) <= 1 and len(args["ops"]) <= 2


# ------------------------------------------------ host operations as ops
LOGGING_ON = ("memslot_logging", dict(which=0, on=True))


def test_a_write_racing_a_harvest_is_reported_by_that_harvest(play):
    """The harvest has taken the bitmap (with the page) and is re-protecting
    it when the vCPU writes again through its still-valid TLB entry: legal,
    the VMM copies the page after KVM_GET_DIRTY_LOG returns."""
    ops = (OpSpec("write", 0), OpSpec("harvest"))
    at_protect = Schedule((Preemption(1, 1, "pte store", 0),))
    for cls in (ClassicCandidate, ReferenceCandidate):
        failure, machine = _play(cls, LOGGING_ON, _parallel(ops, at_protect))
        assert failure is None, str(failure)
        assert any("preemption #0" in e for e in machine.interleavings[-1])


def test_at_most_one_harvest_per_step(play):
    """KVM_GET_DIRTY_LOG runs under slots_lock: a step plans one harvest."""
    ops = (OpSpec("read", 0), OpSpec("harvest"), OpSpec("harvest"))
    failure, machine = _play(ClassicCandidate, LOGGING_ON, _parallel(ops, Schedule(())))
    assert failure is None, str(failure)
    starts = [e for e in machine.interleavings[-1] if " start " in e]
    assert len(starts) == 2, starts


def test_aging_racing_a_fault_passes_and_a_bad_aging_is_caught(play):
    from candidates.mutants.classic_mutants import AgingClearsMoreThanAf

    class ConcurrentAgingClearsMoreThanAf(AgingClearsMoreThanAf):
        capabilities = ClassicCandidate.capabilities

    ops = (OpSpec("write", 0), OpSpec("age", host_op="clear_flush_young"))
    schedule = Schedule((Preemption(0, 1, "pte store", 1),))
    steps = (("guest_write", dict(vcpu=0, where=0, pages=1)), _parallel(ops, schedule))
    failure, _ = _play(ClassicCandidate, *steps)
    assert failure is None, str(failure)
    failure, _ = _play(ConcurrentAgingClearsMoreThanAf, *steps)
    assert isinstance(failure, PropertyViolation) and failure.property == "aging", failure


def test_operations_on_one_vcpu_move_to_a_free_vcpu(play):
    failure, machine = _play(ClassicCandidate, _parallel((OpSpec("read", 1), OpSpec("write", 1)),
                                                         Schedule(())))
    assert failure is None, str(failure)
    starts = [e for e in machine.interleavings[-1] if " start " in e]
    assert [s.split("start  ")[1].split()[0] for s in starts] == ["vCPU1", "vCPU0"]


def test_a_lone_operation_runs_sequentially_and_keeps_interleavings_aligned(play):
    """An invalidation of an unbacked page plans nothing: the step runs its
    one guest access alone, and still records one (empty) interleaving."""
    lone = (OpSpec("read", 0), OpSpec("read", 0), OpSpec("read", 0))
    failure, machine = _play(ClassicCandidate, _parallel(lone[:1] + (OpSpec("harvest"),),
                                                         Schedule(())), _parallel())
    assert failure is None, str(failure)
    assert len(machine.interleavings) == 2 and machine.interleavings[0] == ()


@pytest.mark.parametrize("rule", ["fault_race", "host_race"])
def test_race_rules_are_parallel_steps(rule, play):
    failure, machine = _play(ClassicCandidate, (rule, dict(where=0, ops=RACE,
                                                           schedule=BEFORE_FIRST_STORE,
                                                           refault=True)))
    assert failure is None, str(failure)
    assert machine.interleavings and "parallel: a preemption fired" in machine.events
    failure, _ = _play(PlainStoreInSharedWalk, (rule, dict(where=0, ops=RACE,
                                                           schedule=BEFORE_FIRST_STORE,
                                                           refault=True)))
    assert isinstance(failure, PropertyViolation), failure


def test_aging_interleaved_with_stores_is_judged_store_by_store(play):
    """Aging has cleared AF on the block when vCPU1's access sets it again
    (hardware AF update: a store by another task, lock-free): the snapshot
    before and after the call says nothing about what aging did, so only its
    own stores are judged, and each must only clear AF."""
    from candidates.mutants.classic_mutants import AgingClearsMoreThanAf

    class ConcurrentAgingClearsMoreThanAf(AgingClearsMoreThanAf):
        capabilities = ClassicCandidate.capabilities

    ops = (OpSpec("age", host_op="clear_flush_young"), OpSpec("read", 1))
    after_its_store = Schedule((Preemption(0, 3, "read_pte", 1),))
    steps = (("guest_write", dict(vcpu=0, where=0, pages=1)),
             ("hardware", dict(op="tlb_evict", vcpu=1, where=0)),  # vCPU1 must walk
             _parallel(ops, after_its_store))
    failure, machine = _play(ClassicCandidate, *steps)
    assert failure is None, str(failure)
    trace = machine.interleavings[-1]
    assert any("preemption #0" in e for e in trace)
    assert machine.platform.counters["hw AF updates"] == 1
    failure, _ = _play(ConcurrentAgingClearsMoreThanAf, *steps)
    assert isinstance(failure, PropertyViolation) and failure.property == "aging", failure
    assert "aging stored" in failure.message


def test_a_harvest_may_miss_a_page_whose_writer_has_not_marked_it_yet():
    """vCPU2's fault installs a writable leaf and is preempted before it marks
    the page dirty; vCPU0 writes through the leaf and finishes; the harvest
    then reports nothing; vCPU2 marks the page afterwards. user_mem_abort
    marks after the install: the next harvest reports the page, so this one
    may miss it (the write overlapped it)."""
    config = VmConfig(ipa_bits=40, fwb=True, hw_af=False, dic=True, idc=True, nr_vcpus=3)
    layout = Layout((Memslot(0, 0x40000, 640, HVA, log_dirty_pages=True),),
                    (Vma(HVA, HVA + (1152 << 12), True),), "running", False)
    ops = (OpSpec("write", 2), OpSpec("write", 0), OpSpec("harvest"))
    steps = [("boot", dict(config=config, layout=layout)),
             ("parallel", dict(where=23, refault=True, ops=ops,
                               schedule=Schedule((Preemption(0, 1, "rcu_read_unlock", 1),)))),
             ("memslot_harvest", dict(which=0))]
    failure, machine = play("scripted", ClassicCandidate, steps, "parallel")
    assert failure is None, str(failure)
    assert any("get_dirty_log" in e for e in machine.interleavings[0])


def test_a_declared_known_finding_is_counted_in_a_parallel_step_too():
    """kvm-classic declares block-split-no-cmo: a stale value a parallel
    operation reads from a page a block split dropped is counted, as on the
    sequential machine, not failed; the fixed candidate never shows it."""
    from candidates.classic import ClassicSplitCmoCandidate

    config = VmConfig(ipa_bits=40, fwb=False, hw_af=False, dic=False, idc=False, nr_vcpus=2)
    layout = Layout((Memslot(0, 0x40000, 1024, HVA, log_dirty_pages=True),),
                    (Vma(HVA, HVA + (1536 << 12), True),), "cold", False)
    steps = [("boot", dict(config=config, layout=layout)),
             ("memslot_logging", dict(on=False, which=0)),
             ("guest_write", dict(pages=8, vcpu=2, where=62)),
             ("memslot_logging", dict(on=True, which=1)),
             ("guest_fetch", dict(vcpu=2, where=53)),
             ("parallel", dict(where=62, refault=True, ops=(OpSpec("read", 1),),
                               schedule=Schedule(())))]
    failure, machine = play("scripted", ClassicCandidate, steps, "parallel")
    assert failure is None, str(failure)
    assert machine.platform.counters["known finding: block-split-no-cmo"] == 1
    failure, machine = play("scripted", ClassicSplitCmoCandidate, steps, "parallel")
    assert failure is None and not machine.platform.counters["known finding: block-split-no-cmo"]


def test_a_failing_step_with_a_harvest_is_described():
    """The failure message shows a harvest's reported gfns."""
    from conformance.machines.parallel import ParallelMachine

    assert ParallelMachine._describe(None, frozenset({0x40001, 0x40000})) == \
        "reported {0x40000, 0x40001}"
    assert ParallelMachine._describe(None, None) == "done"


def test_a_failure_after_the_step_shows_the_last_parallel_steps_interleaving(monkeypatch):
    """The plain store's leaked table is found at teardown: the report shows
    the interleaving that caused it, one column per vCPU."""
    from conformance.failures import document, report
    from conformance.platform.monitors import Monitors

    monkeypatch.setattr(Monitors, "plain_store_violation", lambda self, ptep: None)
    failure, machine = _play(PlainStoreInSharedWalk, _parallel())
    assert failure is not None and "teardown" in failure.step
    doc = document.replay_document("scripted", PlainStoreInSharedWalk, failure, machine.calls,
                                   machine.trace, {}, machine=machine)
    text = report.text(report.from_doc(doc))
    assert "interleaving of parallel step 2, the last one before the failing step" in text
    assert ">> to task 1 (preemption #0)" in text


# ------------------------------------------------- release during a run
RELEASE_RACE = (OpSpec("read", 0), OpSpec("release"))
#: The fault is preempted just before it takes mmu_lock: exit_mmap's
#: notifier release detaches and destroys the tree, then the fault resumes.
FAULT_AFTER_RELEASE = Schedule((Preemption(0, 1, "write_lock", 1),
                                Preemption(0, 1, "read_lock", 1)))


@pytest.mark.parametrize("cls", [ClassicCandidate, ReferenceCandidate],
                         ids=["kvm-classic", "reference"])
def test_release_racing_a_fault_exits_and_leaks_nothing(cls, play):
    """Seed 002's race: the fault must find the tree gone and exit; every
    later guest access exits too (oracle R8); teardown finds no leak."""
    race = ("parallel", dict(where=0, ops=RELEASE_RACE, schedule=FAULT_AFTER_RELEASE,
                             refault=True))  # migrated first: the read faults
    failure, machine = _play(cls, ("guest_read", dict(vcpu=1, where=0, pages=1)), race,
                             ("guest_write", dict(vcpu=1, where=0, pages=1)))
    assert failure is None, str(failure)
    assert machine.platform.released and not machine.live
    assert any("preemption #" in e for e in machine.interleavings[-1])


def test_a_fault_that_ignores_release_is_reported_at_its_step():
    """The reference candidate before the fix: its fault path used the tree
    that release had detached (None here) and crashed; the suite reports a
    candidate error naming the parallel step, not a harness crash."""
    from conformance.errors import CandidateError
    from conformance.protocol import Exit
    from model import descriptors as d

    class ReleaseBlind(ReferenceCandidate):
        def handle_guest_abort(self, vcpu, fault):
            slot = self.gfn_to_memslot(fault.gfn)
            if slot is None:
                return Exit.MMIO
            page = self.services.gup(slot.gfn_to_hva(fault.gfn), fault.is_write_fault)
            if page is None:
                return Exit.EFAULT
            with self.services.mmu_write_lock():
                new = d.make_leaf(page.pfn << 12, 3, d.Prot.R | d.Prot.W, self.config.fwb)
                ptep, old, _level = self.pgt.lookup(fault.ipa, alloc_to=3)
                self.pgt.install(ptep, old, new, fault.ipa, 3)
            self.services.release_page(page.pfn)
            return Exit.RESUME

    failure, _ = _play(ReleaseBlind, _parallel(RELEASE_RACE, FAULT_AFTER_RELEASE))
    assert isinstance(failure, CandidateError), failure
    assert "2: parallel(" in failure.step and "handle_guest_abort" in failure.message


# ------------------------------------------------- memslot changes under SRCU
#: Slot 0 logs; vCPU0 wrote gfn 0x40000, so its 2 MiB window holds a 4 KiB
#: table (logging forces 4 KiB pages).
LOGGING_LAYOUT = Layout((Memslot(0, 0x40000, 512, HVA, log_dirty_pages=True),),
                        (Vma(HVA, HVA + (1024 << 12), True),), "cold", False)
SRCU_CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=False, nr_vcpus=2)
#: vCPU1 faults on gfn 0x40002 (task 0), logging is turned off (task 1),
#: vCPU0 faults on gfn 0x40001 (task 2). Task 0 is stopped just before its
#: first store: it looked the memslots up before the change (4 KiB, logging)
#: and has read the window's table entry. The change publishes and waits in
#: synchronize_srcu for task 0; task 2 sees the new memslots and collapses
#: the window into a block; task 0 then maps its page in the unlinked table.
STALE_LOGGING_FAULT = ("memslot_race", dict(
    where=0, ops=(OpSpec("read", 1, neighbour=True), OpSpec("memslot"), OpSpec("read", 0)),
    schedule=Schedule((Preemption(0, 1, "pte store", 1),))))


def _play_srcu(cls, *steps):
    return play("scripted", cls, [("boot", dict(config=SRCU_CONFIG, layout=LOGGING_LAYOUT)),
                                  ("guest_write", dict(vcpu=0, where=0, pages=1)), *steps],
                "parallel")


def test_a_memslot_change_waits_for_the_faults_that_saw_the_old_memslots():
    failure, machine = _play_srcu(ClassicCandidate, STALE_LOGGING_FAULT)
    assert failure is None, str(failure)
    trace = machine.interleavings[-1]
    blocked = next(i for i, e in enumerate(trace) if "block  synchronize_srcu" in e)
    started = next(i for i, e in enumerate(trace) if "task 2  start" in e)
    woke = next(i for i, e in enumerate(trace) if "task 1  wake" in e)
    stale = next(i for i, e in enumerate(trace) if "task 0  pte store  write_pte" in e)
    # The change waits for task 0 only: task 2 runs meanwhile (and collapses
    # the window), task 0 maps its page in the unlinked table, and only then
    # does the change wake.
    assert blocked < started < stale < woke
    assert "(unlinked table)" in trace[stale]
    assert any("task 2  pte store  write_pte IPA 0x40000000 L2: LOCKED -> L2 leaf" in e
               for e in trace[started:stale])  # the collapse
    p = machine.platform
    assert not p.srcu_old and not p.memslots[0].log_dirty_pages


def test_an_inline_collapse_teardown_leaks_the_stale_faults_table():
    """Seed 001's leak (mutant-collapse-teardown-inline): the table page
    under task 0's entry is never freed."""
    from candidates.mutants.concurrency_mutants import CollapseTeardownInline
    failure, _ = _play_srcu(CollapseTeardownInline, STALE_LOGGING_FAULT)
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "table-lifecycle" and "leaked" in str(failure)


def test_a_memslot_change_alone_runs_sequentially():
    failure, machine = _play_srcu(ClassicCandidate, ("memslot_race", dict(
        where=0, ops=(OpSpec("memslot"),), schedule=Schedule(()))))
    assert failure is None, str(failure)
    assert not machine.platform.memslots[0].log_dirty_pages


def test_a_fault_between_publish_and_commit_may_use_the_old_flags():
    """Logging turned on: a fault that looked the memslots up before the swap
    maps a writable block without a dirty mark, which is legal until the
    commit write-protects the slot (the monitors judge by both versions)."""
    layout = attrs.evolve(LOGGING_LAYOUT, memslots=(
        attrs.evolve(LOGGING_LAYOUT.memslots[0], log_dirty_pages=False),))
    failure, machine = play("scripted", ClassicCandidate, [
        ("boot", dict(config=SRCU_CONFIG, layout=layout)),
        ("memslot_race", dict(where=0, ops=(OpSpec("write", 0), OpSpec("memslot")),
                              schedule=Schedule((Preemption(0, 1, "pte store", 1),))))],
        "parallel")
    assert failure is None, str(failure)
    trace = machine.interleavings[-1]
    assert any("L2 leaf" in e and "task 0  pte store" in e for e in trace)  # a block
    assert machine.platform.memslots[0].log_dirty_pages


# ------------------------------------------------------- 1 GiB boundaries
def test_parallel_layouts_may_cross_1_gib_and_sequential_ones_do_not():
    from hypothesis import find
    from strategies.layouts import BELOW_1G_GFN, layouts
    crossing = find(layouts(cross_1g=True), lambda lay: lay.memslots[0].base_gfn == BELOW_1G_GFN)
    slot = crossing.memslots[0]
    assert slot.base_gfn < 0x40000 < slot.end_gfn
    assert (slot.userspace_addr - (slot.base_gfn << 12)) % (2 << 20) == 0  # blocks possible
    with pytest.raises(Exception):
        find(layouts(), lambda lay: lay.memslots[0].base_gfn != 0x40000)


def test_a_wide_invalidation_crosses_1_gib_and_races_release():
    """Seed 002 (mutant-resched-unmap-stale-root): the resumable unmap drops
    mmu_lock between its two 1 GiB chunks; release runs then and its RCU
    grace period ends; kvm-parallel re-reads the root and stops, the mutant
    walks the freed tables."""
    from candidates.kvm_parallel import KvmParallelCandidate
    from candidates.mutants.concurrency_mutants import ReschedUnmapStaleRoot
    layout = Layout((Memslot(0, 0x3FE00, 1024, HVA),),
                    (Vma(HVA, HVA + (1024 << 12), False),), "cold", False)
    steps = [("boot", dict(config=SRCU_CONFIG, layout=layout)),
             ("guest_write", dict(vcpu=0, where=0, pages=64)),
             ("unmap_race", dict(where=0, ops=(
                 OpSpec("invalidate", host_op="madvise_dontneed", wide=True),
                 OpSpec("release")), schedule=Schedule(())))]
    failure, machine = play("scripted", KvmParallelCandidate, steps, "parallel")
    assert failure is None, str(failure)
    assert any("cpu_relax" in e for e in machine.interleavings[-1])
    failure, _ = play("scripted", ReschedUnmapStaleRoot, steps, "parallel")
    assert isinstance(failure, PropertyViolation) and failure.property == "table-lifecycle", \
        failure


@pytest.mark.parametrize("cls", [ClassicCandidate, ReferenceCandidate],
                         ids=["kvm-classic", "reference"])
@pytest.mark.parametrize("other", [
    OpSpec("harvest"), OpSpec("invalidate", host_op="madvise_dontneed", wide=True)])
def test_release_racing_a_harvest_or_an_invalidation_is_legal(other, cls):
    """Once the VMM is exiting, release owns the tables: a harvest or an
    invalidation that finds them detached has nothing to protect or unmap."""
    for schedule in (Schedule(()), Schedule((Preemption(0, 1, "pte store", 1),)),
                     Schedule((Preemption(1, 1, "pte store", 0),))):
        failure, _ = play("scripted", cls, [
            ("boot", dict(config=SRCU_CONFIG, layout=LOGGING_LAYOUT)),
            ("guest_write", dict(vcpu=0, where=0, pages=8)),
            ("parallel", dict(where=0, ops=(OpSpec("release"), other), schedule=schedule))],
            "parallel")
        assert failure is None, f"{schedule}: {failure}"
