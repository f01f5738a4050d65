"""The machine a candidate runs on (DESIGN §2).

The platform owns all mutable world state of one generated program: physical
memory (tables and data), the host mm, the per-vCPU TLBs, guest system
registers, the memslots and dirty bitmaps. The candidate sees it only through
:class:`conformance.services.Services`; the state machine drives it through the
``guest_*``, ``host_*``, ``memslot_*`` and ``hw_*`` methods below.

The safety monitors (:mod:`conformance.monitors`) watch every descriptor store
and every completed candidate call.
"""

from __future__ import annotations

import collections
import signal
import threading
from typing import Any, Callable

import attrs

from conformance.errors import CandidateError, PropertyViolation
from conformance.protocol import (
    SCTLR_C, SCTLR_M, Exit, FaultKind, GuestAbort, Memslot, MemslotChange,
    NotifierEvent, NotifierRange, SysReg, VmConfig)
from model import cache
from model import descriptors as d
from model.geometry import Geometry, granule
from model.host import PAGE, THP_SIZE, HostMm, HostPage, page_down, thp_down
from model.memory import TABLE_USES, PageUse, PhysicalMemory
from model.oracle import Outcome as Access
from model.tlb import Tlb, TlbEntry, WalkEntry
from model.walker import Translation, WalkFault, iter_leaves, iter_subtree, walk_from

#: A guest access that faults more often than this without completing is a
#: livelock (reference §9.2 G5).
MAX_REFAULTS = 12
#: Service calls one candidate call may make before it is declared stuck.
MAX_SERVICE_CALLS = 200_000
#: Wall-clock safety net for a candidate call that never returns (seconds).
CALL_TIMEOUT = 10.0


class _Timeout(BaseException):
    pass


class Platform:
    def __init__(self, config: VmConfig, monitors_cls=None):
        from conformance.monitors import Monitors
        from conformance.services import Services

        self.config = config
        self.geometry = Geometry(config.ipa_bits)
        self.mem = PhysicalMemory()
        self.host = HostMm(self.mem)
        self.tlbs = [Tlb() for _ in range(config.nr_vcpus)]
        self.sctlr = [0] * config.nr_vcpus
        self.tvm = [False] * config.nr_vcpus
        self.cleaned: list[tuple[int, int]] = []  # DC CIVAC ranges of the current call
        self.memslots: dict[int, Memslot] = {}
        self.dirty: dict[int, set[int]] = {}
        self.pgd_pfn: int | None = None
        self.reachable: dict[int, tuple[int, int]] = {}  # table pfn -> (ipa, level)
        self.counters: collections.Counter = collections.Counter()
        self.events: set[str] = set()  # labels for hypothesis.event(), per step
        self.current_vcpu: int | None = None
        self.step: str | None = None
        self.notifiers_in_progress: list[NotifierRange] = []
        self.rcu_callbacks: list[Callable[[], None]] = []
        self.rcu_readers = 0
        self.mmu_lock_readers = 0
        self.mmu_lock_writer = False
        self.service_calls = 0
        self.depth = 0
        self.swallowed: PropertyViolation | None = None
        self.released = False
        self.vmid_dead = False
        #: Slots whose dirty logging was turned off (and not on again since):
        #: faults in them are the cost seed 001 argues about.
        self.unlogged: set[int] = set()
        self.candidate = None
        self.monitors = (monitors_cls or Monitors)(self)
        self.services = Services(self)

    # ------------------------------------------------------------------ errors
    def violation(self, prop: str, message: str) -> PropertyViolation:
        return PropertyViolation(prop, message, step=self.step)

    def fail(self, prop: str, message: str):
        """Raise a violation. It is also remembered, so that a candidate which
        catches exceptions around service calls cannot hide it."""
        exc = self.violation(prop, message)
        if self.swallowed is None:
            self.swallowed = exc
        raise exc

    # --------------------------------------------------------- candidate calls
    def call(self, method: str, *args, vcpu: int | None = None,
             returns: type | tuple | None = type(None)) -> Any:
        """Call ``candidate.method(*args)`` as the harness would: with the vCPU
        context set, exceptions and hangs turned into candidate errors, the
        return type checked, and the per-call monitors run afterwards."""
        fn = getattr(self.candidate, method, None)
        if fn is None:
            raise CandidateError("bad-return", f"candidate has no method {method}()",
                                 step=self.step)
        outer_vcpu, self.current_vcpu = self.current_vcpu, vcpu
        if self.depth == 0:
            self.service_calls = 0
            self.cleaned = []
        self.depth += 1
        try:
            result = self._guarded(fn, method, args)
        finally:
            self.current_vcpu = outer_vcpu
            self.depth -= 1
        if self.swallowed is not None:
            raise self.swallowed
        if returns is not None and not isinstance(result, returns):
            want = returns.__name__ if isinstance(returns, type) else \
                " or ".join(t.__name__ for t in returns)
            raise CandidateError(
                "bad-return", f"{method}() returned {result!r} "
                f"({type(result).__name__}); expected {want}", step=self.step)
        if self.depth == 0:
            self.monitors.after_call(method)
            self.grace_period()
        return result

    def construct(self, candidate_cls):
        """``Candidate(services, config)``, guarded like any other call."""
        self.depth += 1
        try:
            return self._guarded(lambda: candidate_cls(self.services, self.config),
                                 f"{candidate_cls.__name__}()", ())
        finally:
            self.depth -= 1

    def _guarded(self, fn, method, args):
        use_alarm = self.depth == 1 and hasattr(signal, "setitimer") and \
            threading.current_thread() is threading.main_thread()
        if use_alarm:
            def on_alarm(signum, frame):
                raise _Timeout()
            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, CALL_TIMEOUT)
        try:
            return fn(*args)
        except PropertyViolation:
            raise
        except CandidateError:
            raise
        except _Timeout:
            raise CandidateError(
                "timeout", f"{method}() did not return within {CALL_TIMEOUT:g}s",
                step=self.step) from None
        except RecursionError as exc:
            raise CandidateError("raised", f"{method}() raised {exc!r}",
                                 step=self.step) from exc
        except Exception as exc:
            raise CandidateError("raised", f"{method}() raised {type(exc).__name__}: {exc}",
                                 step=self.step) from exc
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

    def count_service_call(self, name: str) -> None:
        self.service_calls += 1
        if self.service_calls > MAX_SERVICE_CALLS:
            raise CandidateError(
                "timeout", f"more than {MAX_SERVICE_CALLS} service calls in one "
                f"candidate call (last: {name}); it does not seem to return",
                step=self.step)

    def grace_period(self) -> None:
        """An RCU grace period: run ``call_rcu`` callbacks once no reader is
        inside a read-side critical section (as late as possible)."""
        while self.rcu_callbacks and self.rcu_readers == 0:
            callbacks, self.rcu_callbacks = self.rcu_callbacks, []
            for cb in callbacks:
                self._guarded(cb, "call_rcu callback", ())
            self.monitors.after_call("call_rcu callback")

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

    # -------------------------------------------------------------- the TLB
    def link(self, table_pfn: int, ipa: int, level: int) -> None:
        """A table became reachable: hardware may now cache all of it."""
        self.reachable[table_pfn] = (ipa, level)
        for step in iter_subtree(self.hw_read_table, table_pfn, level, ipa):
            if d.is_table(step.pte, step.level):
                self.reachable[d.pte_pa(step.pte) >> 12] = (step.ipa, step.level + 1)
            self.monitors.on_new_valid(step.ipa, step.level, step.pte)

    def unlink(self, table_pfn: int, level: int) -> None:
        self.reachable.pop(table_pfn, None)
        entries = self.mem.tables.get(table_pfn)
        if entries is None or self.mem.page_use(table_pfn) is PageUse.FREED:
            return
        for pte in entries:
            if level < 3 and d.is_table(pte, level):
                self.unlink(d.pte_pa(pte) >> 12, level + 1)

    def tlb_fill(self, ipa: int, level: int, pte: int) -> None:
        """Speculative walks: every vCPU may cache a valid, AF=1 descriptor."""
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
            # VTCR_EL2.HA: the walker sets AF atomically (reference §1.5 rule 6).
            self.counters["hw AF updates"] += 1
            self.store_pte(result.ptep, path[-1].pte | d.AF, who="hardware AF update")
            leaf = attrs.evolve(leaf, af=True)
        self.monitors.on_walk(result.ipa, leaf)
        entry = tlb_entry(result.ipa, leaf)
        tlb.insert(entry)
        return tlb.lookup(ipa)[0]

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
        for slot in self.memslots.values():
            if slot.contains_gfn(gfn):
                return slot
        return None

    def guest_cacheable(self, vcpu: int) -> bool:
        bits = SCTLR_M | SCTLR_C
        return self.config.fwb or (self.sctlr[vcpu] & bits) == bits

    def guest_access(self, vcpu: int, ipa: int, kind: str, value: int | None = None) -> Access:
        """A guest load (``read``), store (``write``) or instruction fetch
        (``exec``), retried after every RESUME like a vCPU run loop."""
        write, exec_ = kind == "write", kind == "exec"
        for attempt in range(MAX_REFAULTS):
            result = self.translate(vcpu, ipa, write, exec_)
            if isinstance(result, TlbEntry):
                return self._perform(vcpu, ipa, result, kind, value)
            self.counters[f"faults: {result.kind.value}"] += 1
            slot = self.slot_for_gfn(ipa >> 12) if self.unlogged else None
            if slot is not None and slot.id in self.unlogged:
                self.counters["faults after dirty-log disable"] += 1
            if attempt:
                self.counters["refaults"] += 1
            exit_ = self.call("handle_guest_abort", vcpu, result, vcpu=vcpu, returns=Exit)
            if exit_ is not Exit.RESUME:
                return Access(exit=exit_)
        self.fail("forward-progress", f"vCPU{vcpu} {kind} of IPA {ipa:#x} faulted "
                  f"{MAX_REFAULTS} times in a row without completing (last: "
                  f"{result.kind.value} fault at L{result.level}); the guest livelocks")

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
                # behind (reference §6.1 hazard b).
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

    # -------------------------------------------------------------- host ops
    def host_touch(self, hva: int, write: bool) -> int | None:
        """A VMM access faults the page in (breaking KSM sharing on write)."""
        if self.host.needs_cow(hva, write):
            self.notify(NotifierRange(page_down(hva), page_down(hva) + PAGE,
                                      NotifierEvent.CLEAR),
                        lambda: self.host.cow_break(hva))
        pte = self.host.fault_in(hva, write)
        return None if pte is None else pte.pfn

    def vmm_write(self, hva: int, value: int) -> bool:
        pfn = self.host_touch(hva, True)
        if pfn is None:
            return False
        self.mem.set_line(pfn, cache.cacheable_write(self.mem.line(pfn), value))
        return True

    def vmm_read(self, hva: int) -> int | None:
        pfn = self.host_touch(hva, False)
        if pfn is None:
            return None
        value, line = cache.cacheable_read(self.mem.line(pfn))
        self.mem.set_line(pfn, line)
        return value

    def notify(self, rng: NotifierRange, mutate: Callable[[], None]) -> None:
        """``invalidate_range_start`` → host change → ``invalidate_range_end``."""
        self.notifiers_in_progress.append(rng)
        self.counters[f"notifier: {rng.event.value}"] += 1
        mapped = self.mapped_pages(rng.start, rng.end)
        self.call("invalidate_range_start", rng)
        self.counters["pages unmapped by notifiers"] += \
            mapped - self.mapped_pages(rng.start, rng.end)
        self.monitors.after_invalidate_start(rng)
        mutate()
        self.notifiers_in_progress.remove(rng)
        self.call("invalidate_range_end", rng)
        self.monitors.after_invalidate_end(rng)

    def host_op(self, op: str, start: int, end: int, other: int | None = None) -> None:
        h = self.host
        events = {
            "munmap": (NotifierEvent.UNMAP, lambda: h.munmap(start, end)),
            "madvise_dontneed": (NotifierEvent.CLEAR, lambda: h.madvise_dontneed(start, end)),
            "migrate": (NotifierEvent.MIGRATE, lambda: h.migrate(start)),
            "thp_split": (NotifierEvent.CLEAR, lambda: h.thp_split(start)),
            "thp_collapse": (NotifierEvent.CLEAR, lambda: h.thp_collapse(start)),
            "mprotect_ro": (NotifierEvent.PROTECTION_VMA, lambda: h.mprotect(start, end, False)),
            "mprotect_rw": (NotifierEvent.PROTECTION_UPGRADE,
                            lambda: h.mprotect(start, end, True)),
            "ksm_merge": (NotifierEvent.CLEAR, lambda: h.ksm_merge(other, start)),
        }
        event, mutate = events[op]
        for hva in (start, end - PAGE):  # split_huge_pmd: CLEAR over the whole PMD
            pte = h.pte(hva)
            window = thp_down(hva)
            if pte is not None and pte.huge and not (start <= window and window + THP_SIZE <= end) \
                    and op not in ("thp_split", "thp_collapse", "migrate"):
                self.notify(NotifierRange(window, window + THP_SIZE, NotifierEvent.CLEAR),
                            lambda w=window: h.thp_split(w))
        if op == "ksm_merge":  # write_protect_page on the kept page first
            self.notify(NotifierRange(page_down(other), page_down(other) + PAGE,
                                      NotifierEvent.CLEAR), lambda: h.ksm_protect(other))
        if op in ("thp_split", "thp_collapse"):
            start, end = thp_down(start), thp_down(start) + THP_SIZE
        elif op == "migrate":
            pte = h.pte(start)
            if pte is not None and pte.huge:
                start, end = thp_down(start), thp_down(start) + THP_SIZE
        self.notify(NotifierRange(start, end, event), mutate)

    def host_mmap(self, start: int, end: int, thp: bool) -> None:
        self.host.mmap(start, end, writable=True, thp=thp)

    def aging(self, op: str, start: int, end: int) -> bool:
        rng = NotifierRange(start, end, NotifierEvent.CLEAR)
        before = self.monitors.before_aging(rng)
        young = self.call(op, rng, returns=bool)
        self.counters[f"aging: {op}"] += 1
        self.monitors.after_aging(op, rng, before, young)
        return young

    def _vmid_dead(self) -> None:
        """No vCPU runs once the VM is being torn down; KVM relies on VMID
        rollover instead of TLBIs (reference §5.2), which empties the TLBs, and
        frees the detached tree without clearing entries first."""
        self.vmid_dead = True
        for tlb in self.tlbs:
            tlb.invalidate_all()

    def exit_mmap(self) -> None:
        self._vmid_dead()
        self.call("release")
        self.released = True
        self.host.exit_mmap()

    # --------------------------------------------------------------- memslots
    def set_memslot(self, old: Memslot | None, new: Memslot | None,
                    change: MemslotChange) -> None:
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
        self.call("commit_memory_region", old, new, change)
        self.monitors.after_memslot(old, new, change)

    def get_dirty_log(self, slot: Memslot) -> frozenset[int]:
        got = self.call("get_dirty_log", slot, returns=(frozenset, set))
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

    # ------------------------------------------------------------- queries
    def gup(self, hva: int, write: bool) -> HostPage | None:
        pfn = self.host_touch(hva, write)
        if pfn is None:
            return None
        pte = self.host.pte(hva)
        self.host.get_page(pfn)
        return HostPage(pfn, pte.writable)

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


def tlb_entry(ipa: int, leaf: d.Leaf) -> TlbEntry:
    return TlbEntry(ipa, leaf.level, leaf.oa, leaf.read, leaf.write, leaf.exec, leaf.memattr)
