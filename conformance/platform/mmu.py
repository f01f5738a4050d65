"""The guest's MMU on the platform (DESIGN §2): TLBs, the hardware walk and
the data access.

The TLB may keep whatever the architecture lets it keep: every valid, AF=1
descriptor reachable from the PGD may be cached by every vCPU as soon as it is
published (:meth:`Mmu.tlb_fill`), a stale entry wins over the tables, and a
walk may start from a cached table pointer (rules §1.5). A guest data access
goes through the D-cache model with non-cacheable bypass (rules §6.1).
"""

from __future__ import annotations

import attrs

from conformance.protocol import Exit, FaultKind, GuestAbort
from model import cache
from model import descriptors as d
from model.host import page_down
from model.memory import PageUse
from model.oracle import Outcome as Access
from model.tlb import TlbEntry, WalkEntry
from model.walker import WalkFault, iter_subtree, walk_from

#: A guest access that faults more often than this without completing is a
#: livelock (rules §9.2 G5).
MAX_REFAULTS = 12


class Mmu:
    """The part of :class:`~conformance.platform.core.Platform` that plays the
    hardware (a mixin: the state lives on the platform)."""

    def link(self, table_pfn: int, ipa: int, level: int) -> None:
        """A table became reachable: hardware may now cache all of it."""
        self.reachable[table_pfn] = (ipa, level)
        for step in iter_subtree(self.hw_read_table, table_pfn, level, ipa):
            if d.is_table(step.pte, step.level):
                self.reachable[d.pte_pa(step.pte) >> 12] = (step.ipa, step.level + 1)
            self.monitors.on_new_valid(step.ipa, step.level, step.pte)

    def unlink(self, table_pfn: int, level: int) -> None:
        """A table (and its subtree) is no longer reachable from the root. A
        walker inside an RCU read-side section may still be in it: the page
        may be freed only after those sections end."""
        self.reachable.pop(table_pfn, None)
        self.unlinked_during[table_pfn] = self.rcu.open_sections()
        entries = self.mem.tables.get(table_pfn)
        if entries is None or self.mem.page_use(table_pfn) is PageUse.FREED:
            return
        for pte in entries:
            if level < 3 and d.is_table(pte, level):
                self.unlink(d.pte_pa(pte) >> 12, level + 1)

    def tlb_fill(self, ipa: int, level: int, pte: int) -> None:
        """Speculative walks: every vCPU may cache a valid, AF=1 descriptor
        (none once the VM's VMID is dead: no vCPU runs)."""
        if self.vmid_dead:
            return
        if d.is_table(pte, level):
            entry = WalkEntry(ipa, level, d.pte_pa(pte) >> 12)
            for tlb in self.tlbs:
                tlb.insert_walk(entry)
            return
        leaf = d.decode(pte, level)
        if leaf.af:
            entry = tlb_entry(ipa, leaf)
            for tlb in self.tlbs:
                tlb.insert(entry)

    def translate(self, vcpu: int, ipa: int, write: bool, exec_: bool):
        """The MMU: TLB first (stale entries win), then a walk that may start
        from a cached table pointer. Returns a TlbEntry or a GuestAbort."""
        tlb = self.tlbs[vcpu]
        hits = tlb.lookup(ipa)
        if len(hits) > 1:
            self.fail("tlb-conflict", f"vCPU{vcpu} TLB holds conflicting entries for "
                      f"IPA {ipa:#x}: " + "; ".join(h.describe() for h in hits))
        if not hits:
            result = self._walk(vcpu, ipa)
            if isinstance(result, GuestAbort):
                return attrs.evolve(result, write=write, exec=exec_)
            hits = [result]
        entry = hits[0]
        if (write and not entry.write) or (exec_ and not entry.exec) or not entry.read:
            return GuestAbort(page_down(ipa), FaultKind.PERMISSION, entry.level,
                              write=write, exec=exec_)
        return entry

    def _walk(self, vcpu: int, ipa: int):
        tlb = self.tlbs[vcpu]
        cached = tlb.deepest_walk(ipa)
        path = []
        if cached is not None:
            result = walk_from(self.hw_read_table, cached.table_pfn, cached.level + 1,
                               ipa, path)
        else:
            page, _ = self.geometry.pgd_slot(ipa)
            result = walk_from(self.hw_read_table, self.pgd_pfn + page,
                               self.geometry.start_level, ipa, path)
        if isinstance(result, WalkFault):
            return GuestAbort(page_down(ipa), result.kind, result.level)
        for step in path[:-1]:
            tlb.insert_walk(WalkEntry(step.ipa, step.level, d.pte_pa(step.pte) >> 12))
        leaf = result.leaf
        if not leaf.af:
            if not self.config.hw_af:
                return GuestAbort(page_down(ipa), FaultKind.ACCESS_FLAG, leaf.level)
            # VTCR_EL2.HA: the walker sets AF atomically (rules §1.5 rule 6).
            self.counters["hw AF updates"] += 1
            self.store_pte(result.ptep, path[-1].pte | d.AF, who="hardware AF update")
            leaf = attrs.evolve(leaf, af=True)
        self.monitors.on_walk(result.ipa, leaf)
        entry = tlb_entry(result.ipa, leaf)
        tlb.insert(entry)
        return tlb.lookup(ipa)[0]

    def guest_access(self, vcpu: int, ipa: int, kind: str, value: int | None = None) -> Access:
        """A guest load (``read``), store (``write``) or instruction fetch
        (``exec``), retried after every RESUME like a vCPU run loop."""
        write, exec_ = kind == "write", kind == "exec"
        attempt = stuck = 0
        while stuck < MAX_REFAULTS:
            in_task = self.scheduler is not None and self.scheduler.current is not None
            if in_task:
                # One point per attempt, before the translation: a hardware
                # walk and the access it leads to are atomic here, because a
                # TLBI completes only after the walks and accesses in flight
                # that use what it removes (Arm ARM D8, TLB maintenance).
                self.yield_point("hw access", f"vCPU{vcpu} {kind} IPA {ipa:#x}")
            if self.vmid_dead:  # exit_mmap: the vCPU never enters the guest again
                return Access(exit=Exit.EFAULT)
            result = self.translate(vcpu, ipa, write, exec_)
            if isinstance(result, TlbEntry):
                return self._perform(vcpu, ipa, result, kind, value)
            self.counters[f"faults: {result.kind.value}"] += 1
            slot = self.slot_for_gfn(ipa >> 12) if self.unlogged else None
            if slot is not None and slot.id in self.unlogged:
                self.counters["faults after dirty-log disable"] += 1
            if attempt:
                self.counters["refaults"] += 1
            attempt += 1
            # kvm_handle_guest_abort runs inside srcu_read_lock(&kvm->srcu).
            self.ctx.memslots = self.memslot_view
            try:
                exit_ = self.call("handle_guest_abort", vcpu, result, vcpu=vcpu, returns=Exit)
            finally:
                self.ctx.memslots = None
            if exit_ is not Exit.RESUME:
                return Access(exit=exit_)
            # A refault while another task can still run (it may hold the
            # entry LOCKED, or be half-way through a change) is a cpu_relax,
            # not a sign of livelock: only refaults nobody else could have
            # helped count (the scheduler bounds the rest).
            if not (in_task and self._others_ran()):
                stuck += 1
        self.fail("forward-progress", f"vCPU{vcpu} {kind} of IPA {ipa:#x} faulted "
                  f"{MAX_REFAULTS} times in a row without completing (last: "
                  f"{result.kind.value} fault at L{result.level}); the guest livelocks")

    def _others_ran(self) -> bool:
        """Let another task run (``cpu_relax``); did one?"""
        s = self.scheduler
        before = s.statistics().switches
        s.cpu_relax()
        self.ctx = self.task_ctx[s.current]
        return s.statistics().switches > before

    def _perform(self, vcpu: int, ipa: int, entry: TlbEntry, kind: str, value) -> Access:
        pfn = entry.translate(ipa) >> 12
        use = self.mem.page_use(pfn)
        if use is not PageUse.DATA:
            self.fail("stale-translation",
                      f"vCPU{vcpu} {kind} of IPA {ipa:#x} went through {entry.describe()} "
                      f"to PA {pfn << 12:#x}, which is "
                      f"{use.value if use else 'not a host page'}")
        self.monitors.on_guest_access(vcpu, ipa, entry, kind)
        line = self.mem.line(pfn)
        cacheable = self.guest_cacheable(vcpu) and d.memtype_of(
            entry.memattr, self.config.fwb) is d.MemType.NORMAL
        if kind == "write":
            if not cacheable:
                # Adversarial: the cacheable alias has just pulled the old value
                # in, so the non-cacheable store leaves a stale clean line
                # behind (rules §6.1 hazard b).
                line = cache.speculative_fill(line)
            line = cache.cacheable_write(line, value) if cacheable else cache.nc_write(line, value)
            self.mem.set_line(pfn, line)
            return Access(value=value)
        if kind == "exec":
            got, line = cache.ifetch(line, idc=self.config.idc, dic=self.config.dic)
        elif cacheable:
            got, line = cache.cacheable_read(line)
        else:
            got = cache.nc_read(line)
        self.mem.set_line(pfn, line)
        return Access(value=got)

    def hw_tlb_evict(self, vcpu: int, nth: int) -> None:
        tlb = self.tlbs[vcpu]
        keys = sorted(tlb.leaves)
        if keys:
            del tlb.leaves[keys[nth % len(keys)]]

    def hw_cache(self, op: str, pfn: int) -> None:
        fn = {"evict": cache.clean_inval, "fill": cache.speculative_fill,
              "ievict": cache.iinval,
              "ifill": lambda s: cache.ispeculative_fill(
                  s, idc=self.config.idc, dic=self.config.dic)}[op]
        if self.mem.page_use(pfn) is PageUse.DATA:
            self.mem.set_line(pfn, fn(self.mem.line(pfn)))


def tlb_entry(ipa: int, leaf: d.Leaf) -> TlbEntry:
    return TlbEntry(ipa, leaf.level, leaf.oa, leaf.read, leaf.write, leaf.exec, leaf.memattr)
