"""``kvm-pkvm`` (candidates/pkvm.py): the RCU-less design (a rwlock, unmap on
the write side, no table collapse), driven through scripted programs on the
real machines and on a bare platform.

Each behaviour is checked against a control that must fail the same check:
kvm-classic (which uses RCU and collapses lazily) or a broken variant of
kvm-pkvm, so that none of these tests can pass vacuously."""

from __future__ import annotations

import pytest

from candidates.classic import PMD_SIZE, ClassicCandidate
from candidates.pgtable import EAGAIN, HANDLE_FAULT, SHARED, Stage2PgTable
from candidates.pkvm import PkvmCandidate, PkvmPgTable
from conformance.errors import PropertyViolation
from conformance.failures.polish import play
from conformance.machines.parallel import OpSpec, machine_class
from conformance.platform.core import Platform
from conformance.platform.scheduler import Preemption, Schedule
from conformance.platform.services import Services
from conformance.protocol import Memslot, MemslotChange, VmConfig
from model import descriptors as d
from model.memory import PageUse
from strategies.layouts import Layout, Vma

HVA = 0x4000_0000
BASE_GFN = 0x40000
IPA = BASE_GFN << 12
#: Two vCPUs, no FWB, no hardware AF (aging makes access-flag faults); a cold,
#: THP-backed, congruent 2 MiB slot: where=0 is gfn 0x40000, its neighbour
#: (where=1) 0x40001.
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=False, nr_vcpus=2)
LAYOUT = Layout((Memslot(0, BASE_GFN, 512, HVA),), (Vma(HVA, HVA + (512 << 12), True),),
                "cold", False)
BOOT = ("boot", dict(config=CONFIG, layout=LAYOUT))


def _parallel(ops, schedule, where=0):
    return ("parallel", dict(where=where, ops=ops, schedule=schedule))


def _leaves(platform):
    """``{ipa: (level, writable, executable)}`` of every valid leaf of slot 0."""
    return {step.ipa: (leaf.level, leaf.write, leaf.exec)
            for step, leaf in platform.leaves(IPA, IPA + PMD_SIZE)}


class RcuSpy:
    """Counts the RCU services a candidate calls (wrapping the real ones)."""

    NAMES = ("rcu_read_lock", "rcu_read_unlock", "call_rcu")

    def __init__(self, monkeypatch):
        self.calls = {name: 0 for name in self.NAMES}
        for name in self.NAMES:
            real = getattr(Services, name)

            def spy(svc, *args, _real=real, _name=name):
                self.calls[_name] += 1
                return _real(svc, *args)

            monkeypatch.setattr(Services, name, spy)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


# --------------------------------------------------- a race of two faults
#: vCPU0 and vCPU1 fault on the same unmapped page; task 0 is preempted just
#: before its first PTE store, after reading the (empty) entry: task 1 maps the
#: page (a 2 MiB block), then task 0's cmpxchg must fail.
RACE = _parallel((OpSpec("read", 0), OpSpec("write", 1)),
                 Schedule((Preemption(0, 1, "pte store", 1),)))


class _PlainStorePgTable(PkvmPgTable):
    """kvm-pkvm's page table with a plain store where a shared walk needs
    ``cmpxchg`` (the control for the race)."""

    def try_set_pte(self, ctx, new):
        self.svc.write_pte(ctx.ptep, new)
        return True


class _PlainStorePkvm(PkvmCandidate):
    pgtable_cls = _PlainStorePgTable


def test_two_faults_on_one_unmapped_page_under_a_preemption_pass(monkeypatch):
    spy = RcuSpy(monkeypatch)
    failure, machine = play("kvm-pkvm", PkvmCandidate, [BOOT, RACE], "parallel")
    assert failure is None, str(failure)
    assert "parallel: a preemption fired" in machine.events
    assert spy.total == 0, spy.calls


def test_the_race_catches_a_plain_store_in_the_shared_walk():
    """The same program fails when the read-side walker does not use cmpxchg:
    both tasks 'win' the empty entry."""
    failure, _ = play("broken", _PlainStorePkvm, [BOOT, RACE], "parallel")
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property in ("locking", "refcount", "table-lifecycle", "break-before-make",
                                "tlb-conflict", "guest-observation"), str(failure)


# ------------------------------------------ dirty logging off: unmap, refault
def _logging_program(machine):
    """A block, split by a write while logging; logging off; returns the L3
    table the split installed."""
    machine.boot(**BOOT[1])
    machine.guest_read(vcpu=0, where=0, pages=1)
    assert _leaves(machine.platform) == {IPA: (2, True, False)}
    machine.memslot_logging(which=0, on=True)
    machine.guest_write(vcpu=0, where=3, pages=1)  # gfn 0x40005: splits the block
    (step, leaf), = machine.platform.leaves(IPA, IPA + PMD_SIZE)
    assert (step.ipa, leaf.level, leaf.write) == (IPA + 0x5000, 3, True)
    machine.memslot_logging(which=0, on=False)
    return step.table_pfn


def test_logging_off_unmaps_the_slot_and_the_next_fault_maps_a_block(monkeypatch):
    spy = RcuSpy(monkeypatch)
    m = machine_class("kvm-pkvm", PkvmCandidate, "sequential")()
    table = _logging_program(m)
    p = m.platform
    # The split of the block by the write cleaned the old block: no page left
    # stage 2 without a clean (kvm-classic's finding block-split-no-cmo).
    assert p.counters["pages dropped by a block split without CMO"] == 0
    # The slot's range is unmapped under the write lock, and the table that
    # held the 4 KiB page is freed at once (no grace period to wait for).
    assert _leaves(p) == {}
    assert p.mem.page_use(table) is PageUse.FREED
    faults = p.counters["faults after dirty-log disable"]
    m.guest_read(vcpu=1, where=4, pages=1)  # gfn 0x40100
    assert _leaves(p) == {IPA: (2, True, False)}  # a 2 MiB block again
    assert p.counters["faults after dirty-log disable"] == faults + 1
    m.guest_read(vcpu=0, where=3, pages=1)  # the page written while logging:
    assert p.counters["faults after dirty-log disable"] == faults + 1  # same block
    m.teardown()
    assert p.counters["rcu callbacks"] == 0
    assert spy.total == 0, spy.calls


def test_kvm_classic_keeps_the_page_after_logging_off():
    """The control: kvm-classic does nothing when logging stops (lazy
    collapse), and its split drops the block's other pages without a clean,
    so the assertions above fail for it."""
    m = machine_class("kvm-classic", ClassicCandidate, "sequential")()
    table = _logging_program(m)
    assert _leaves(m.platform) == {IPA + 0x5000: (3, True, False)}
    assert m.platform.mem.page_use(table) is PageUse.TABLE
    assert m.platform.counters["pages dropped by a block split without CMO"] == 511
    m.teardown()


# --------------------------------------------------------- no RCU, ever
def test_kvm_pkvm_makes_no_rcu_service_call_where_kvm_classic_does(monkeypatch):
    """The same programs (a fault race, logging on/off, aging, notifiers, a
    collapse opportunity) through both candidates: kvm-classic's shared walks
    take rcu_read_lock (so the spy works); kvm-pkvm never calls RCU."""
    spy = RcuSpy(monkeypatch)
    steps = [BOOT, RACE,
             ("memslot_logging", dict(which=0, on=True)),
             ("guest_write", dict(vcpu=0, where=3, pages=8)),
             ("memslot_harvest", dict(which=0)),
             ("memslot_logging", dict(which=0, on=False)),
             ("host_aging", dict(op="clear_flush_young", where=3, huge=False)),
             ("guest_read", dict(vcpu=1, where=3, pages=8)),
             ("host_mm", dict(op="migrate", where=0, huge=False)),
             ("guest_fetch", dict(vcpu=0, where=1))]
    failure, _ = play("kvm-classic", ClassicCandidate, steps, "parallel")
    assert failure is None, str(failure)
    assert spy.calls["rcu_read_lock"] > 0, spy.calls
    spy.calls = dict.fromkeys(RcuSpy.NAMES, 0)
    failure, machine = play("kvm-pkvm", PkvmCandidate, steps, "parallel")
    assert failure is None, str(failure)
    assert spy.total == 0, spy.calls
    assert machine.platform.counters["rcu callbacks"] == 0


# ------------------------- why no collapse: a collapse without RCU is a UAF
class _CollapseWithoutRcuPgTable(PkvmPgTable):
    """kvm-pkvm's page table with kvm-classic's collapse put back, and the
    old subtree freed at once since there is no RCU (the control)."""

    map = Stage2PgTable.map
    _map_walker = Stage2PgTable._map_walker

    def free_unlinked_table(self, table, level):
        self.free_unlinked(table, level)


class _CollapseWithoutRcu(PkvmCandidate):
    pgtable_cls = _CollapseWithoutRcuPgTable
    disable_logging = ClassicCandidate.disable_logging  # lazy collapse again


#: After a 4 KiB page was mapped while logging and logging went off, aging
#: clears its AF; then vCPU1's access-flag fault walks down to it under the
#: read lock (mkyoung) while vCPU0's translation fault on the neighbour maps a
#: 2 MiB block. vCPU1 is preempted after reading the L2 entry, i.e. on its way
#: into the L3 table.
COLLAPSE_RACE = [
    BOOT,
    ("memslot_logging", dict(which=0, on=True)),
    ("guest_write", dict(vcpu=0, where=0, pages=1)),
    ("memslot_logging", dict(which=0, on=False)),
    ("host_aging", dict(op="clear_flush_young", where=0, huge=False)),
    _parallel((OpSpec("read", 1), OpSpec("read", 0, neighbour=True)),
              Schedule((Preemption(0, 3, "read_pte", 1),))),
]


def test_a_collapse_without_rcu_frees_a_table_a_reader_is_in():
    """The hazard design 1 removes: without RCU, the collapsing fault frees
    the L3 table while vCPU1's walker is about to read it."""
    failure, _ = play("broken", _CollapseWithoutRcu, COLLAPSE_RACE, "parallel")
    assert isinstance(failure, PropertyViolation), failure
    assert failure.property == "table-lifecycle", str(failure)
    assert "after it was freed" in failure.message, str(failure)


@pytest.mark.parametrize("cls", [PkvmCandidate, ClassicCandidate],
                         ids=["kvm-pkvm", "kvm-classic"])
def test_the_collapse_race_passes_with_rcu_or_without_collapse(cls):
    failure, machine = play("scripted", cls, COLLAPSE_RACE, "parallel")
    assert failure is None, str(failure)
    assert "parallel: a preemption fired" in machine.events


# ------------------------- a table in the way of a block: map at 4 KiB
class _LazyPkvm(PkvmCandidate):
    """kvm-pkvm that leaves 4 KiB pages behind when logging stops, to put a
    table in the way of the block the next fault in the window asks for (the
    fault path and the page table are kvm-pkvm's)."""

    disable_logging = ClassicCandidate.disable_logging

    def map_block(self, ipa: int, pfn: int) -> int:
        """What a racing fault that decided on a 2 MiB block does."""
        with self.services.mmu_read_lock():
            return self.pgt.map(ipa, PMD_SIZE, pfn << 12, d.Prot.R,
                                flags=SHARED | HANDLE_FAULT)


def _boot(cls):
    p = Platform(CONFIG)
    p.host_mmap(HVA, HVA + PMD_SIZE, True)
    p.step = "boot"
    p.candidate = p.construct(cls)
    for vcpu in range(CONFIG.nr_vcpus):
        p.call("vcpu_init", vcpu, vcpu=vcpu)
    slot = Memslot(0, BASE_GFN, 512, HVA)
    p.set_memslot(None, slot, MemslotChange.CREATE)
    logging = Memslot(0, BASE_GFN, 512, HVA, log_dirty_pages=True)
    p.set_memslot(slot, logging, MemslotChange.FLAGS_ONLY)
    p.guest_access(0, IPA + 0x5000, "write", 7)  # 4 KiB, RW, under an L3 table
    p.set_memslot(logging, slot, MemslotChange.FLAGS_ONLY)
    assert _leaves(p) == {IPA + 0x5000: (3, True, False)}
    return p


@pytest.mark.parametrize("cls, collapses", [(_LazyPkvm, False), (ClassicCandidate, True)],
                         ids=["kvm-pkvm", "kvm-classic"])
def test_a_table_in_the_way_of_a_block_maps_the_faulting_page(cls, collapses, monkeypatch):
    p = _boot(cls)
    spy = RcuSpy(monkeypatch)
    ranges = p.counters["tlbi: range"]
    assert p.guest_access(1, IPA + 0x7000, "read").exit is None
    if collapses:  # the control: kvm-classic replaces the table by a block
        assert _leaves(p) == {IPA: (2, True, False)}
        assert spy.calls["call_rcu"] == 1
        return
    assert _leaves(p) == {IPA + 0x5000: (3, True, False), IPA + 0x7000: (3, True, False)}
    # A permission fault on a 4 KiB leaf of a THP window asks for a block too;
    # it is served by relaxing the leaf that faulted (a local TLBI).
    local = p.counters["tlbi: ipa local"]
    assert p.guest_access(0, IPA + 0x5000, "exec").exit is None
    assert _leaves(p)[IPA + 0x5000] == (3, True, True)
    assert p.counters["tlbi: ipa local"] == local + 1
    assert p.counters["tlbi: range"] == ranges  # no table was broken
    assert spy.total == 0, spy.calls
    p.destroy()


def test_a_racing_block_map_leaves_the_table_alone():
    """A fault that decided on a block before another installed a table there
    (no abort registered for the map's fallback) gets -EAGAIN, and the table
    and its page stay."""
    p = _boot(_LazyPkvm)
    before = _leaves(p)
    pfn = p.host.pte(HVA).pfn & ~511
    assert p.call("map_block", IPA, pfn, vcpu=0, returns=int) == EAGAIN
    assert _leaves(p) == before
    p.destroy()
