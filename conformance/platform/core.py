"""The machine a candidate runs on (DESIGN §2).

The platform owns all mutable world state of one generated program: physical
memory (tables and data), the host mm, the per-vCPU TLBs, guest system
registers, the memslots and dirty bitmaps. The candidate sees it only through
:class:`conformance.platform.services.Services`; the state machine drives it
through the ``guest_*``, ``host_*``, ``memslot_*`` and ``hw_*`` methods.

One class, three concerns in their own modules: calling the candidate
(:mod:`.calls`), the hardware (:mod:`.mmu`) and the host mm
(:mod:`.host_events`). The safety monitors (:mod:`.monitors`) watch every
descriptor store and every completed candidate call.
"""

from __future__ import annotations

import collections

from conformance.errors import CandidateError, PropertyViolation
from conformance.platform.calls import CandidateCalls
from conformance.platform.drops import DroppedPages
from conformance.platform.host_events import HostEvents
from conformance.platform.locking import Locking
from conformance.platform.mmu import Mmu
from conformance.platform.monitors import Monitors
from conformance.platform.services import Services
from conformance.platform.sync import Rcu, RwLock
from conformance.platform.tasks import TaskContext
from conformance.protocol import (
    SCTLR_C, SCTLR_M, Memslot, MemslotChange, NotifierRange, SysReg, VmConfig)
from model import descriptors as d
from model.geometry import Geometry, granule
from model.host import HostMm
from model.memory import TABLE_USES, PageUse, PhysicalMemory
from model.tlb import Tlb
from model.walker import iter_leaves


class Platform(CandidateCalls, Locking, Mmu, HostEvents):
    """The world of one generated program (see the module docstring)."""

    def __init__(self, config: VmConfig, monitors_cls=None):
        self.config = config
        self.geometry = Geometry(config.ipa_bits)
        self.mem = PhysicalMemory()
        self.host = HostMm(self.mem)
        self.tlbs = [Tlb() for _ in range(config.nr_vcpus)]
        self.sctlr = [0] * config.nr_vcpus
        self.tvm = [False] * config.nr_vcpus
        self.memslots: dict[int, Memslot] = {}
        #: ``self.memslots`` sorted by base gfn: the array a vCPU's exit
        #: handler looks up (rebuilt when a change is published).
        self.memslot_view: tuple[Memslot, ...] = ()
        #: Slot id -> the version a memslot change of a parallel step replaced,
        #: until the change has committed (a fault may still use it until
        #: ``synchronize_srcu`` returns, a TLB entry until the commit).
        self.srcu_old: dict[int, Memslot] = {}
        self.dirty: dict[int, set[int]] = {}
        self.pgd_pfn: int | None = None
        self.reachable: dict[int, tuple[int, int]] = {}  # table pfn -> (ipa, level)
        #: Unlinked table pfn -> the RCU read-side sections open at the unlink.
        self.unlinked_during: dict[int, frozenset] = {}
        self.counters: collections.Counter = collections.Counter()
        self.events: set[str] = set()  # labels for hypothesis.event(), per step
        #: The running task's context (the one default context when sequential).
        self.ctx = TaskContext()
        #: The deterministic scheduler during a parallel step, else ``None``;
        #: ``task_ctx`` maps its task ids to their contexts.
        self.scheduler = None
        self.task_ctx: dict[int, TaskContext] = {}
        self.step: str | None = None
        self.notifiers_in_progress: list[NotifierRange] = []
        # Every lock service is already a scheduling point (Services._enter).
        self.mmu_lock = RwLock(None, "mmu_lock", points=False)
        self.rcu = Rcu(None)
        self.released = False
        self.vmid_dead = False
        #: Slots whose dirty logging was turned off (and not on again since):
        #: faults in them are the cost seed 001 argues about.
        self.unlogged: set[int] = set()
        self.candidate = None
        #: Pages a block split dropped without CMO (the known finding
        #: block-split-no-cmo; docs/findings.md).
        self.drops = DroppedPages(self)
        self.monitors = (monitors_cls or Monitors)(self)
        self.services = Services(self)

    # ------------------------------------------------------------------ errors
    def violation(self, prop: str, message: str) -> PropertyViolation:
        return PropertyViolation(prop, message, step=self.step)

    def fail(self, prop: str, message: str):
        """Raise a violation. It is also remembered, so that a candidate which
        catches exceptions around service calls cannot hide it."""
        exc = self.violation(prop, message)
        if self.ctx.swallowed is None:
            self.ctx.swallowed = exc
        raise exc

    # ------------------------------------------------------------ tasks
    def in_task(self) -> bool:
        """Is a parallel step's task running (so this is a scheduling point)?"""
        return self.scheduler is not None and self.scheduler.current is not None

    def yield_point(self, kind: str, detail: str = "") -> None:
        """A scheduling point of the running task: another task may run
        before this returns, so the task's context is restored after it.
        RCU callbacks whose grace period has elapsed become tasks here."""
        s = self.scheduler
        if self.rcu.pending():
            self.rcu.poll()
        s.point(kind, detail)
        self.ctx = self.task_ctx[s.current]

    def quiesce(self, label: str) -> None:
        """Every task of a parallel step has finished: the checks that need
        quiescence (refcounts, LOCKED entries, locks, GUP references, dirty
        marks), then the RCU grace period the tasks' callbacks waited for."""
        self.monitors.after_call(label)
        self.grace_period()

    @property
    def current_vcpu(self) -> int | None:
        """The running task's vCPU (``None`` on a host thread)."""
        return self.ctx.vcpu

    @current_vcpu.setter
    def current_vcpu(self, vcpu: int | None) -> None:
        self.ctx.vcpu = vcpu

    @property
    def cleaned(self) -> list[tuple[int, int]]:
        """``dcache_clean_inval_poc`` ranges of the running task's current call."""
        return self.ctx.cleaned

    # ----------------------------------------------------------- table memory
    def table(self, pfn: int, who: str) -> list[int]:
        use = self.mem.use.get(pfn)
        if use in TABLE_USES:  # every PTE access comes here: keep it short
            return self.mem.tables[pfn]
        if use is PageUse.FREED:
            self.fail("table-lifecycle", f"{who} used table page PA {pfn << 12:#x} "
                      "after it was freed")
        self.fail("table-lifecycle", f"{who} used PA {pfn << 12:#x} as a table page, "
                  f"but it is {use.value if use else 'not allocated'}")

    def hw_read_table(self, pfn: int) -> list[int]:
        return self.table(pfn, "the hardware walker")

    def entry_ipa(self, pfn: int, idx: int) -> tuple[int, int] | None:
        loc = self.reachable.get(pfn)
        if loc is None:
            return None
        base, level = loc
        return base + idx * granule(level), level

    def store_pte(self, ptep: int, new: int, who: str = "candidate") -> int:
        pfn, idx = ptep >> 12, (ptep & 0xFFF) >> 3
        entries = self.table(pfn, f"{who} PTE store")
        old = entries[idx]
        entries[idx] = new
        self.monitors.on_store(pfn, idx, old, new)
        return old

    # ------------------------------------------------------------ guest ops
    def ipa_ranges(self, start: int, end: int):
        """``(slot, lo, hi)``: the IPA range of every memslot part backed by
        hvas ``[start, end)``."""
        for slot in self.memslots.values():
            lo, hi = max(start, slot.userspace_addr), min(end, slot.hva_end)
            if lo < hi:
                yield slot, slot.hva_to_gfn(lo) << 12, slot.hva_to_gfn(hi - 1) + 1 << 12

    def mapped_pages(self, start: int, end: int) -> int:
        """4 KiB pages of stage 2 that map hvas ``[start, end)``."""
        return sum((min(hi, step.ipa + granule(step.level)) - max(lo, step.ipa)) >> 12
                   for _, lo, hi in self.ipa_ranges(start, end)
                   for step, _ in self.leaves(lo, hi))

    def slot_for_gfn(self, gfn: int) -> Memslot | None:
        """The memslot holding ``gfn``, as the monitors judge it. While a
        memslot change of a parallel step has not committed, a fault (until
        ``synchronize_srcu``) or a TLB entry (until the commit re-protects)
        may still use the version it replaced; a slot then counts as logging
        only if both versions log."""
        for slot in self.memslots.values():
            if slot.contains_gfn(gfn):
                old = self.srcu_old.get(slot.id)
                return old if old is not None and not old.is_logging else slot
        return None

    def guest_cacheable(self, vcpu: int) -> bool:
        bits = SCTLR_M | SCTLR_C
        return self.config.fwb or (self.sctlr[vcpu] & bits) == bits

    def vcpu_init(self, vcpu: int) -> None:
        self.call("vcpu_init", vcpu, vcpu=vcpu)
        self.monitors.after_vcpu_init(vcpu)

    def guest_write_sctlr(self, vcpu: int, new: int) -> None:
        old = self.sctlr[vcpu]
        self.sctlr[vcpu] = new
        if not self.tvm[vcpu]:
            return
        bits = SCTLR_M | SCTLR_C
        toggled = (old & bits == bits) != (new & bits == bits)
        before = self.monitors.mapped_cacheable()
        self.call("handle_sysreg_write", vcpu, SysReg.SCTLR_EL1, old, new, vcpu=vcpu)
        if toggled:
            state = "on" if new & bits == bits else "off"
            self.monitors.check_full_flush(
                before, f"vCPU{vcpu} turned its MMU/caches {state} (trapped SCTLR_EL1 "
                f"write {old:#x} -> {new:#x})")

    def guest_set_way(self, vcpu: int) -> None:
        first = not self.tvm[vcpu]
        before = self.monitors.mapped_cacheable()
        self.call("handle_set_way", vcpu, vcpu=vcpu)
        if first:
            self.monitors.check_full_flush(
                before, f"vCPU{vcpu} issued its first set/way operation (DC CISW, "
                "trapped with TVM clear)")

    def _vmid_dead(self) -> None:
        """No vCPU runs once the VM is being torn down; KVM relies on VMID
        rollover instead of TLBIs (rules §5.2), which empties the TLBs, and
        frees the detached tree without clearing entries first."""
        self.vmid_dead = True
        for tlb in self.tlbs:
            tlb.invalidate_all()

    def exit_mmap(self) -> None:
        """The VMM process exits: no vCPU enters the guest again, the MMU
        notifier ``release`` runs (perhaps while faults are in flight, in a
        parallel step), then the host's page tables go. Once only."""
        if self.released:
            return
        self._vmid_dead()
        self.call("release")
        self.released = True
        self.host.exit_mmap()

    # --------------------------------------------------------------- memslots
    def set_memslot(self, old: Memslot | None, new: Memslot | None,
                    change: MemslotChange) -> None:
        """``KVM_SET_USER_MEMORY_REGION``, sequentially: publish, then commit."""
        self._publish_memslot(old, new)
        self._commit_memslot(old, new, change)

    def set_memslot_srcu(self, old: Memslot, new: Memslot, change: MemslotChange) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` in a parallel step, as ``kvm_set_memslot``
        orders it: ``kvm_swap_active_memslots`` publishes the new array, then
        ``synchronize_srcu`` waits for every exit handler that looked up the
        old one to return, then ``kvm_arch_commit_memory_region``. Until the
        wait ends a fault may run with either version (rules §4.6)."""
        if not self.in_task():
            return self.set_memslot(old, new, change)
        self.yield_point("memslot swap", f"slot {old.id}")
        self._publish_memslot(old, new)
        self.srcu_old[old.id] = old
        view = self.memslot_view
        self.scheduler.wait_until(
            lambda: all(c.memslots is None or c.memslots is view
                        for c in self.task_ctx.values()),
            "synchronize_srcu: an exit handler still uses the old memslots")
        self.ctx = self.task_ctx[self.scheduler.current]
        try:  # until the commit has re-protected, a write may still use the old flags
            self._commit_memslot(old, new, change)
        finally:
            del self.srcu_old[old.id]

    def _publish_memslot(self, old: Memslot | None, new: Memslot | None) -> None:
        if old is not None:
            del self.memslots[old.id]
        if new is not None:
            self.memslots[new.id] = new
            if new.is_logging and not (old is not None and old.is_logging):
                self.dirty[new.id] = set()
            elif new.is_logging:  # MOVE keeps the bitmap, relative to the slot base
                self.dirty[new.id] = {g - old.base_gfn + new.base_gfn
                                      for g in self.dirty.get(old.id, ())}
        if new is None or not new.is_logging:
            self.dirty.pop((old or new).id, None)
        if old is not None:
            self.unlogged.discard(old.id)
        if new is not None and not new.is_logging and old is not None and old.is_logging:
            self.unlogged.add(new.id)
        self.memslot_view = tuple(sorted(self.memslots.values(), key=lambda s: s.base_gfn))

    def _commit_memslot(self, old: Memslot | None, new: Memslot | None,
                        change: MemslotChange) -> None:
        self.call("commit_memory_region", old, new, change)
        self.monitors.after_memslot(old, new, change)

    def get_dirty_log(self, slot: Memslot) -> frozenset[int]:
        try:
            got = self.call("get_dirty_log", slot, returns=(frozenset, set))
        finally:
            self.monitors.harvesting.pop(slot.id, None)
        bad = [g for g in got if not isinstance(g, int) or not slot.contains_gfn(g)]
        if bad:
            raise CandidateError("bad-return", f"get_dirty_log(slot {slot.id}) returned "
                                 f"gfns outside the slot: {sorted(map(hex, bad))[:4]}",
                                 step=self.step)
        self.monitors.after_harvest(slot)
        return frozenset(got)

    def destroy(self) -> None:
        self._vmid_dead()
        if not self.released:
            self.call("release")
            self.released = True
        self.call("destroy")
        self.monitors.after_destroy()

    # --------------------------------------------------------- hardware ops
    def describe_state(self, limit: int = 40) -> list[str]:
        """The stage-2 leaves and every vCPU's TLB, for failure reports."""
        out = []
        if self.pgd_pfn is None:
            out.append("stage 2: no PGD installed")
        else:
            leaves = self.leaves(0, self.geometry.ipa_limit)
            out.append(f"stage 2 (PGD PA {self.pgd_pfn << 12:#x}): {len(leaves)} leaves")
            for step, leaf in leaves[:limit]:
                out.append(f"  IPA {step.ipa:#x}: {d.describe(step.pte, step.level)}")
        for vcpu, tlb in enumerate(self.tlbs):
            entries = sorted(tlb.leaves.values(), key=lambda e: (e.ipa, e.level))
            out.append(f"vCPU{vcpu} TLB: {len(entries)} leaf entries, "
                       f"{len(tlb.walks)} walk-cache entries")
            out.extend(f"  {e.describe()}" for e in entries[:limit])
        return out

    def leaves(self, start: int, end: int):
        if self.pgd_pfn is None:
            return []
        return list(iter_leaves(self.hw_read_table, self.geometry, self.pgd_pfn, start, end))
