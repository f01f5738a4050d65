"""Architecture-level safety monitors (DESIGN §2; rules §9).

They run on platform events, independently of the oracle, and raise a
:class:`~conformance.errors.PropertyViolation` naming the property family:

============================  ==============================================
``break-before-make``         valid → different valid without an invalid
                              step (§2.4, §9.3 T1), or a fault that breaks a
                              leaf only to remake it with fewer permissions
                              (§2.5 map step 3, T7)
``tlb-conflict``              a new translation while a TLB still holds an
                              overlapping different one (missing TLBI, T1/T3)
``tlb-maintenance``           a permission fault handled (RESUME) while the
                              faulting vCPU's TLB still holds the entry it
                              faulted on and the leaf now grants the access
                              (missing local TLBI, §7.5, §9.3 T4)
``stale-translation``         S2 or a TLB still maps an address after
                              ``invalidate_range_start`` or a memslot delete
                              returned, or the guest used a freed page (N1, T2)
``memslot-fidelity``          a leaf maps the wrong host page, outside its
                              memslot, or writable where it may not be (G1–G3)
``dirty-logging``             writable while logging but not marked dirty, a
                              block created or writable while logging, not
                              re-protected after enable or harvest (D1–D5)
``table-lifecycle``           leak, double free, use after free, freed while
                              linked or still in a walk cache (S2, T3)
``refcount``                  ``refcount(T) != 1 + non-zero entries`` or a
                              LOCKED entry left behind when quiescent (S2, S3)
``host-page-refs``            a GUP reference not released (N6)
``aging``                     wrong young answer, or aging changed more than
                              AF (N4)
``cache-maintenance``         without FWB: TVM not armed at vCPU reset, or a
                              trapped MMU/cache toggle or the first set/way op
                              that returns before all S2-mapped RAM was
                              cleaned+invalidated to PoC (§6.3, §6.4, C4)
``locking``                   mmu_lock misuse (GUP under the lock, unbalanced)
``forward-progress``          a guest access livelocks (G5; raised by the
                              platform)
============================  ==============================================
"""

from __future__ import annotations

from conformance.protocol import (
    Exit, FaultKind, GuestAbort, MemslotChange, NotifierEvent, NotifierRange)
from model import descriptors as d
from model.geometry import granule
from model.memory import PageUse

PAGE_4K = 1 << 12
_SIZE = {1: "1 GiB block", 2: "2 MiB block", 3: "4 KiB page"}

#: Bits a live leaf may change without break-before-make (rules §1.5 rule 2).
ATTR_ONLY = d.S2_PERMS | d.AF | d.SW_MASK

#: Candidate calls that change what a fault may rely on: while one runs (or
#: a notifier range is between start and end) a fault may legitimately
#: return without fixing anything (``mmu_invalidate_retry``, a memslot
#: change, the mm going away).
HOST_CHANGES = frozenset({"invalidate_range_start", "invalidate_range_end",
                          "commit_memory_region", "release", "destroy"})


class _Abort:
    """A ``handle_guest_abort`` call in flight (one per task)."""

    __slots__ = ("vcpu", "fault", "entry", "epoch", "quiet", "memslots", "broken")

    def __init__(self, vcpu: int, fault: GuestAbort, entry, epoch: int, quiet: bool,
                 memslots: list):
        self.vcpu, self.fault, self.entry, self.epoch = vcpu, fault, entry, epoch
        #: Nothing else changed the host's view when the call began.
        self.quiet = quiet
        self.memslots = memslots
        #: ptep -> the valid leaf this call broke there (stored 0 or LOCKED).
        self.broken: dict[int, int] = {}


class Monitors:
    def __init__(self, platform):
        self.p = platform
        self.touched: set[int] = set()
        self.pending_dirty: set[tuple[int, int]] = set()
        #: gfns per memslot taken by a harvest that has not returned yet.
        self.harvesting: dict[int, set[int]] = {}
        #: Entries holding INVALID_PTE_LOCKED -> the task that stored it.
        self.locked_by: dict[int, int | None] = {}
        #: 2 MiB window of a PA -> leaves ``(ipa, level, oa)`` unmapped there
        #: since the end of the last call (the TLBI may not have come yet).
        self.unmapped: dict[int, list[tuple[int, int, int]]] = {}
        #: Descriptor stores so far, by anyone.
        self.stores = 0
        self.last_valid: dict[tuple[int, int], int] = {}
        #: Begins and ends of HOST_CHANGES calls so far, and how many run.
        self.host_epoch = 0
        self.host_changing = 0
        #: Task id -> its ``handle_guest_abort`` call in flight.
        self.aborts: dict[int | None, _Abort] = {}
        #: vCPU -> a T4 violation of its access in flight, reported when that
        #: access completes or exits (a livelock is reported as such instead).
        self.tlbi_missed: dict[int, str] = {}

    def fail(self, prop: str, message: str):
        self.p.fail(prop, message)

    # ------------------------------------------------------ descriptor stores
    def on_store(self, pfn: int, idx: int, old: int, new: int) -> None:
        self.touched.add(pfn)
        self.stores += 1
        ctx = self.p.ctx
        ctx.stores += 1
        ptep = (pfn << 12) | (idx << 3)
        if new == d.INVALID_PTE_LOCKED:
            self.locked_by[ptep] = self.p.task_id()
        elif old == d.INVALID_PTE_LOCKED:
            self.locked_by.pop(ptep, None)
        loc = self.p.entry_ipa(pfn, idx)
        if loc is None or old == new:
            return
        ipa, level = loc
        if self.aborts and ctx.depth == 1:
            self._check_no_downgrade(ptep, ipa, level, old, new)
        if ctx.aging and not (d.is_valid(old) and new == old & ~d.AF):
            self.fail("aging", f"aging stored {d.describe(new, level)} over "
                      f"{d.describe(old, level)} at IPA {ipa:#x} L{level}: aging may only "
                      "clear AF (rules §9.5 N4)")
        if d.is_valid(old) and d.is_valid(new):
            if d.is_table(old, level) or d.is_table(new, level) or (old ^ new) & ~ATTR_ONLY:
                self.fail("break-before-make",
                          f"IPA {ipa:#x} L{level}: live {d.describe(old, level)} replaced "
                          f"by {d.describe(new, level)} without break-before-make "
                          "(invalid + TLBI first; rules §2.4, §9.3 T1)")
        if d.is_valid(old) and not d.is_table(old, level) and not self.p.config.fwb \
                and (not d.is_valid(new) or d.pte_pa(new) != d.pte_pa(old)):
            oa = d.pte_pa(old)
            self.unmapped.setdefault(oa >> 21, []).append((ipa, level, oa))
        if d.is_valid(old) and d.is_table(old, level):
            self.p.unlink(d.pte_pa(old) >> 12, level + 1)
        elif level < 3 and d.is_valid(old) and not d.is_valid(new):
            self.p.drops.block_broken(pfn, idx, ipa, level, old)
        self._note_transition(pfn, idx, level, old, new)
        if d.is_valid(new):
            if d.is_table(new, level):
                self.p.tlb_fill(ipa, level, new)
                self.p.link(d.pte_pa(new) >> 12, ipa, level + 1)
            else:
                self.on_new_valid(ipa, level, new, fresh=not d.is_valid(old), old=old)

    def _note_transition(self, pfn: int, idx: int, level: int, old: int, new: int) -> None:
        """Statistics for ``--hypothesis-show-statistics``: what the generated
        programs actually did to the tree."""
        ev = self.p.events
        if d.is_valid(old) and not d.is_valid(new):
            ev.add("break-before-make" if new == d.INVALID_PTE_LOCKED or new == 0 else "unmap")
        if not d.is_valid(new):
            return
        prev = self.last_valid.get((pfn, idx), 0)
        self.last_valid[(pfn, idx)] = new
        was_table, is_table = d.is_table(prev, level), d.is_table(new, level)
        if d.is_valid(prev) and not was_table and is_table:
            ev.add("split: block -> table")
        elif was_table and not is_table:
            ev.add("collapse: table -> block")
        elif d.is_valid(prev) and not is_table and (new & ~prev) & (d.S2AP_W | d.S2AP_R):
            ev.add("permissions relaxed")

    def on_new_valid(self, ipa: int, level: int, pte: int, fresh: bool = True,
                     old: int = 0) -> None:
        if d.is_table(pte, level):
            self.p.tlb_fill(ipa, level, pte)
            return
        leaf = d.decode(pte, level)
        if fresh:
            self._check_no_conflict(ipa, leaf)
            self.p.events.add(f"leaf created: {_SIZE[level]}")
        gained_write = leaf.write and not (d.is_valid(old) and old & d.S2AP_W)
        if fresh or gained_write:
            self._check_fidelity(ipa, leaf, fresh)
        self.p.tlb_fill(ipa, level, pte)

    def _check_no_conflict(self, ipa: int, leaf: d.Leaf) -> None:
        size = granule(leaf.level)
        for vcpu, tlb in enumerate(self.p.tlbs):
            for e in tlb.overlapping(ipa, ipa + size):
                if (e.ipa, e.level, e.oa, e.memattr) != (ipa, leaf.level, leaf.oa, leaf.memattr):
                    self.fail("tlb-conflict",
                              f"new {d.describe(leaf.encode(), leaf.level)} at IPA {ipa:#x} "
                              f"while vCPU{vcpu}'s TLB still holds {e.describe()}: the old "
                              "translation was never invalidated (missing or too narrow "
                              "TLBI; rules §9.3 T1/T3)")

    def _check_fidelity(self, ipa: int, leaf: d.Leaf, fresh: bool) -> None:
        p = self.p
        size = granule(leaf.level)
        gfn0, npages = ipa >> 12, size >> 12
        slot = p.slot_for_gfn(gfn0)
        what = f"{d.describe(leaf.encode(), leaf.level)} at IPA {ipa:#x}"
        if slot is None or gfn0 + npages > slot.end_gfn:
            self.fail("memslot-fidelity", f"{what} covers gfns outside any single memslot "
                      "(rules §3.3, §9.2 G2)")
        if d.memtype_of(leaf.memattr, p.config.fwb) is not d.MemType.NORMAL:
            self.fail("memslot-fidelity", f"{what}: guest RAM must be mapped Normal")
        if leaf.write and slot.readonly:
            self.fail("memslot-fidelity", f"{what} is writable in read-only memslot "
                      f"{slot.id} (rules §9.2 G3/G4)")
        if slot.is_logging and leaf.level < 3 and (fresh or leaf.write):
            self.fail("dirty-logging", f"{what}: a {'writable ' if leaf.write else ''}block "
                      f"in memslot {slot.id} while dirty logging is on (only 4K leaves, "
                      "rules §4.3, §9.4 D5)")
        for i in range(npages):
            hva = slot.gfn_to_hva(gfn0 + i)
            pte = p.host.pte(hva)
            pa = leaf.oa + (i << 12)
            if pte is None or pte.pfn != pa >> 12:
                host = "nothing" if pte is None else f"PA {pte.pfn << 12:#x}"
                self.fail("memslot-fidelity",
                          f"{what} maps gfn {gfn0 + i:#x} (hva {hva:#x}) to PA {pa:#x}, "
                          f"but the host maps that hva to {host} "
                          "(rules §3.3, §9.2 G1)")
            if leaf.write and not pte.writable:
                self.fail("memslot-fidelity",
                          f"{what} is writable but the host page at hva {hva:#x} is "
                          "read-only (KSM/copy-on-write or mprotect; rules §9.2 G3)")
            for rng in p.notifiers_in_progress:
                if rng.start <= hva < rng.end and rng.event is not NotifierEvent.PROTECTION_UPGRADE:
                    self.fail("stale-translation",
                              f"{what} installed for hva {hva:#x} between "
                              f"invalidate_range_start and _end ({rng.event.value}; "
                              "the fault must retry, rules §9.5 N2)")
        if slot.is_logging and leaf.write:
            self.pending_dirty.add((slot.id, gfn0))

    def on_walk(self, ipa: int, leaf: d.Leaf) -> None:
        pass

    def on_guest_access(self, vcpu: int, ipa: int, entry, kind: str) -> None:
        if self.tlbi_missed:
            self._report_missed_tlbi(vcpu)
        if kind != "write":
            return
        gfn = ipa >> 12
        slot = self.p.slot_for_gfn(gfn)
        if slot is None or (slot.id, gfn) in self.pending_dirty:
            # Made writable by a fault still in flight (a parallel step): it
            # must mark the page before it returns, which is checked when the
            # step quiesces (rules §9.4 D2 (ii)).
            return
        if slot.is_logging and gfn not in self.p.dirty.get(slot.id, ()) \
                and gfn not in self.harvesting.get(slot.id, ()):
            self.fail("dirty-logging",
                      f"vCPU{vcpu} wrote gfn {gfn:#x} in logging memslot {slot.id} through "
                      f"{entry.describe()} but the gfn is not marked dirty: a writable "
                      "translation exists while logging without a dirty mark "
                      "(rules §9.4 D2/D3)")

    # ------------------------------------------------------ the fault path
    def call_begins(self, method: str, args: tuple):
        """A candidate call starts (after the platform counted its depth):
        what :meth:`call_ends` needs, or ``None`` if nothing is watched."""
        if method in HOST_CHANGES:
            self.host_epoch += 1
            self.host_changing += 1
            return method
        if method != "handle_guest_abort" or self.p.ctx.depth != 1:
            return None
        vcpu, fault = args
        hits = self.p.tlbs[vcpu].lookup(fault.ipa) if fault.kind is FaultKind.PERMISSION \
            else ()
        watch = _Abort(vcpu, fault, hits[0] if hits else None, self.host_epoch,
                       not (self.host_changing or self.p.notifiers_in_progress),
                       list(self.p.memslots.items()))
        self.aborts[self.p.task_id()] = watch
        return watch

    def call_ends(self, watch, result, returned: bool = True) -> None:
        if isinstance(watch, str):
            self.host_epoch += 1
            self.host_changing -= 1
            return
        self.aborts.pop(self.p.task_id(), None)
        if not returned:
            return
        if result is Exit.RESUME:
            self._check_local_tlbi(watch)
        elif self.tlbi_missed:
            self._report_missed_tlbi(watch.vcpu)

    def _check_local_tlbi(self, w: _Abort) -> None:
        """T4: when the handler of a permission fault returns to the guest,
        the faulting vCPU's TLB holds no entry weaker than the leaf. Arm ARM
        D8 (TLB behaviour) lets a TLB keep the entry that caused a permission
        fault, so after ``kvm_pgtable_stage2_relax_perms`` the faulting CPU
        must invalidate its copy locally (``__kvm_tlb_flush_vmid_ipa_nsh``),
        also when its ``cmpxchg`` lost (``-EAGAIN``; "KVM: arm64: Always
        invalidate TLB for stage-2 permission faults", Sep 2023; rules §7.5,
        §9.3 T4). Checked only if no notifier range, memslot change or
        ``release`` overlapped the call (``mmu_invalidate_retry`` resumes
        without a TLBI then), and only for the very entry that faulted, still
        cached. Reported when the access completes (one fault later), so that
        a handler that never invalidates shows as the livelock it causes."""
        e, fault, p = w.entry, w.fault, self.p
        if e is None or not w.quiet or w.epoch != self.host_epoch or p.vmid_dead \
                or w.memslots != list(p.memslots.items()) \
                or p.tlbs[w.vcpu].leaves.get((e.level, e.ipa)) is not e:
            return
        leaves = p.leaves(fault.ipa, fault.ipa + PAGE_4K)
        if not leaves:
            return
        step, leaf = leaves[0]
        want = "write" if fault.write else "fetch" if fault.exec else "read"
        if not _grants(leaf, fault) or _grants(e, fault):
            return
        self.tlbi_missed.setdefault(
            w.vcpu, f"vCPU{w.vcpu}'s {want} permission fault on IPA {fault.ipa:#x} "
            f"returned to the guest with its TLB still holding {e.describe()}, the entry "
            f"it faulted on, while stage 2 grants the {want} "
            f"({d.describe(step.pte, step.level)}): the faulting CPU must invalidate "
            "its own copy before resuming, also when another vCPU relaxed the leaf "
            "first (local TLBI after relax_perms on 0 or -EAGAIN; rules §7.5, "
            "§9.3 T4, §8 bug 14)")

    def _report_missed_tlbi(self, vcpu: int) -> None:
        why = self.tlbi_missed.pop(vcpu, None)
        if why is not None:
            self.fail("tlb-maintenance", why)

    def _check_no_downgrade(self, ptep: int, ipa: int, level: int, old: int,
                            new: int) -> None:
        """The fault path never lowers a valid leaf's permissions: where the
        old and the new leaf differ only in S2AP/XN, ``stage2_map_walker_try_leaf``
        returns ``-EAGAIN`` (``!stage2_pte_needs_update``) and leaves raising
        them to ``relax_perms`` (rules §2.5 map step 3, §3.2.1). Seen as a
        store pair of one ``handle_guest_abort`` call: it breaks a leaf
        (0 or LOCKED), then makes the same leaf with fewer permissions."""
        w = self.aborts.get(self.p.task_id())
        if w is None:
            return
        if d.is_valid(old) and not d.is_table(old, level) \
                and new in (0, d.INVALID_PTE_LOCKED):
            w.broken[ptep] = old
            return
        was = w.broken.pop(ptep, None)
        if was is None or not d.is_valid(new) or d.is_table(new, level) \
                or (was ^ new) & ~d.S2_PERMS:
            return
        lost = (was & ~new & (d.S2AP_R | d.S2AP_W)) | (new & ~was & d.XN)
        if lost:
            self.fail("break-before-make",
                      f"vCPU{w.vcpu}'s fault broke {d.describe(was, level)} at IPA "
                      f"{ipa:#x} and remade it as {d.describe(new, level)}: the same "
                      "leaf with fewer permissions. The map path leaves a leaf that "
                      "differs only in permissions alone (-EAGAIN), so that a stale "
                      "fault never undoes another vCPU's relaxation "
                      "(stage2_map_walker_try_leaf, !stage2_pte_needs_update; rules "
                      "§2.5 map step 3, §3.2.1, §9.3 T7)")

    def on_table_freed(self, pfn: int) -> None:
        self._check_grace_period(pfn)
        if pfn in self.p.reachable and self.p.mem.page_use(pfn) is not PageUse.PGD \
                and not self.p.vmid_dead:
            self.fail("table-lifecycle", f"table page PA {pfn << 12:#x} freed while still "
                      "linked into the stage-2 tree (use after free by every walker)")
        for vcpu, tlb in enumerate(self.p.tlbs):
            entry = tlb.references_table(pfn)
            if entry is not None:
                self.fail("table-lifecycle",
                          f"table page PA {pfn << 12:#x} freed while vCPU{vcpu}'s walk cache "
                          f"still points to it (L{entry.level} entry for IPA {entry.ipa:#x}); "
                          "it was never covered by a TLBI (rules §9.3 T3)")

    def plain_store_violation(self, ptep: int) -> str | None:
        """What is wrong with a ``write_pte`` about to be made, if anything.

        ``write_pte`` to an entry other walkers can see needs the write
        side of mmu_lock, or must publish an entry this task holds LOCKED: a
        shared walker (read lock, or RCU alone) stores with ``cmpxchg`` from
        the value it read, or it overwrites whatever another walker installed
        meanwhile (``stage2_try_set_pte``, ``stage2_make_pte``; rules §7.2)."""
        p = self.p
        pfn = ptep >> 12
        if p.released or p.vmid_dead:
            return None  # the tree is detached (kvm_pgtable_stage2_destroy runs unlocked)
        if pfn not in p.reachable and p.mem.page_use(pfn) is not PageUse.PGD:
            return None  # a table not linked yet (or any more): nobody else sees it
        task = p.task_id()
        if p.mmu_lock.held_by(task) == "write":
            return None
        old = p.mem.tables[pfn][(ptep & 0xFFF) >> 3]
        if old == d.INVALID_PTE_LOCKED and self.locked_by.get(ptep, "nobody") == task:
            return None
        loc = p.entry_ipa(pfn, (ptep & 0xFFF) >> 3)
        where = f"IPA {loc[0]:#x} L{loc[1]}" if loc else f"entry {ptep:#x}"
        held = p.mmu_lock.held_by(task)
        held = f"held for {held}" if held else "not held"
        return (f"plain store (write_pte) to the live entry for {where} with mmu_lock "
                f"{held}: a shared walker must store with cmpxchg from the value it read, "
                "or publish an entry it holds LOCKED (stage2_try_set_pte, stage2_make_pte; "
                "rules §7.2)")

    def before_clean(self, lo: int, hi: int) -> None:
        """Without FWB, the clean+invalidate after an unmap comes after the
        TLBI: before it a vCPU may still write through its TLB entry and
        dirty the line again (``stage2_unmap_put_pte`` then
        ``dcache_clean_inval_poc``; rules §6.2, §9.6 C3)."""
        for window in range(lo >> 21, ((hi - 1) >> 21) + 1):
            for ipa, level, oa in self.unmapped.get(window, ()):
                if not (oa < hi and lo < oa + granule(level)):
                    continue
                for vcpu, tlb in enumerate(self.p.tlbs):
                    for e in tlb.lookup(ipa):
                        # the unmapped leaf itself, still cached, and not mapped again
                        if e.write and (e.ipa, e.level, e.oa) == (ipa, level, oa) \
                                and not self._still_mapped(ipa, level, oa):
                            self.fail("cache-maintenance", f"clean+invalidate of PA "
                                      f"{max(lo, oa):#x} after unmapping IPA {ipa:#x} but "
                                      f"before the TLBI: vCPU{vcpu} can still write through "
                                      f"{e.describe()} and dirty the line again (TLBI "
                                      "first, then clean; rules §6.2, §9.6 C3)")

    def _still_mapped(self, ipa: int, level: int, oa: int) -> bool:
        return any(step.ipa == ipa and step.level == level and leaf.oa == oa
                   for step, leaf in self.p.leaves(ipa, ipa + PAGE_4K))

    def _check_grace_period(self, pfn: int) -> None:
        """A table unlinked while another task was inside an RCU read-side
        section may be freed only once that section has ended: the task may
        have read the table's address before the unlink and still walk it
        (rules §7.2; KVM frees unlinked tables from an RCU callback,
        ``stage2_free_unlinked_table`` via ``call_rcu``)."""
        p = self.p
        during = p.unlinked_during.pop(pfn, None)
        if not during:
            return
        me = p.task_id()
        inside = sorted((t, sid) for t, sid in during & p.rcu.open_sections() if t != me)
        if inside:
            task = inside[0][0]
            who = f"task {task}" + (f" ({p.scheduler.name_of(task)})" if p.scheduler else "")
            self.fail("table-lifecycle", f"table page PA {pfn << 12:#x} freed while {who} is "
                      "still inside the RCU read-side section it was in when the table was "
                      "unlinked: it may still be walking the table (free it after a grace "
                      "period, call_rcu; rules §7.3)")

    # ------------------------------------------------------- after calls
    def after_call(self, method: str) -> None:
        p = self.p
        self.unmapped.clear()
        if p.drops.broken:
            p.drops.settle()
        for pfn in self.touched:
            if pfn not in p.reachable or p.mem.page_use(pfn) is not PageUse.TABLE:
                continue
            entries = p.mem.tables[pfn]
            if d.INVALID_PTE_LOCKED in entries:
                self.fail("refcount", f"{method}() returned leaving a LOCKED entry in table "
                          f"PA {pfn << 12:#x} (rules §9.1 S3)")
            want = 1 + sum(1 for e in entries if e)
            if p.mem.refcount[pfn] != want:
                self.fail("refcount", f"table page PA {pfn << 12:#x} has refcount "
                          f"{p.mem.refcount[pfn]} but 1 + {want - 1} non-zero entries after "
                          f"{method}() (rules §2.3, §9.1 S2)")
        self.touched.clear()
        for slot_id, gfn in sorted(self.pending_dirty):
            if slot_id in p.dirty and gfn not in p.dirty[slot_id]:
                self.fail("dirty-logging", f"{method}() made gfn {gfn:#x} writable in logging "
                          f"memslot {slot_id} but did not mark it dirty "
                          "(rules §4.3, §9.4 D2)")
        self.pending_dirty.clear()
        if p.mmu_lock_writer or p.mmu_lock_readers:
            self.fail("locking", f"{method}() returned with mmu_lock held")
        if p.rcu_readers:
            self.fail("locking", f"{method}() returned inside an RCU read-side section")
        refs = {pfn: n for pfn, n in p.host.gup_refs.items() if n}
        if refs:
            pas = ", ".join(f"PA {pfn << 12:#x}" for pfn in sorted(refs)[:4])
            self.fail("host-page-refs", f"{method}() returned still holding GUP references "
                      f"on {pas} (rules §3.2 step 20, §9.5 N6)")

    def _check_unmapped(self, start: int, end: int, why: str) -> None:
        if self.p.vmid_dead:
            # The VMM is exiting (release raced the invalidation): no vCPU
            # runs again, and release may have detached the tables the
            # invalidation would have unmapped (kvm_free_stage2_pgd).
            return
        for step, leaf in self.p.leaves(start, end):
            self.fail("stale-translation", f"{why}, stage 2 still maps "
                      f"{d.describe(step.pte, step.level)} at IPA {step.ipa:#x} "
                      "(rules §9.5 N1)")
        for vcpu, tlb in enumerate(self.p.tlbs):
            for e in tlb.overlapping(start, end):
                self.fail("stale-translation", f"{why}, vCPU{vcpu}'s TLB still holds "
                          f"{e.describe()} (rules §9.3 T2)")

    def after_invalidate_start(self, rng: NotifierRange) -> None:
        if rng.event is NotifierEvent.PROTECTION_UPGRADE:
            return  # no KVM-visible obligation (rules §5.4, §9.5 N5)
        for slot, lo, hi in self.p.ipa_ranges(rng.start, rng.end):
            self._check_unmapped(lo, hi, f"after invalidate_range_start({rng.event.value}, "
                                 f"hva {rng.start:#x}-{rng.end:#x}) returned")

    def after_invalidate_end(self, rng: NotifierRange) -> None:
        # Existing leaves are re-checked for fidelity only: the dirty-mark
        # obligation belongs to the call that made a leaf writable.
        if self.p.vmid_dead:
            return  # as in _check_unmapped: release owns the tables now
        pending = set(self.pending_dirty)
        for slot, lo, hi in self.p.ipa_ranges(rng.start, rng.end):
            for step, leaf in self.p.leaves(lo, hi):
                self._check_fidelity(step.ipa, leaf, fresh=False)
        self.pending_dirty = pending

    def before_aging(self, rng: NotifierRange):
        ctx = self.p.ctx
        leaves = [(step.ipa, leaf) for slot, lo, hi in self.p.ipa_ranges(rng.start, rng.end)
                  for step, leaf in self.p.leaves(lo, hi)]
        return leaves, self.stores - ctx.stores

    def after_aging(self, op: str, rng: NotifierRange, before, young: bool) -> None:
        """What aging returned and left behind, against the leaves before it.
        If another task of a parallel step stored meanwhile, only the
        per-store rule applies (:meth:`on_store`): the snapshot no longer
        tells what the call saw."""
        ctx = self.p.ctx
        before, others = before
        if self.stores - ctx.stores != others:
            return
        expected = any(leaf.af for _, leaf in before)
        if young != expected:
            self.fail("aging", f"{op}(hva {rng.start:#x}-{rng.end:#x}) returned {young}, "
                      f"but {'some' if expected else 'no'} leaf in range had AF set "
                      "(rules §9.5 N4)")
        after = {ipa: leaf for slot, lo, hi in self.p.ipa_ranges(rng.start, rng.end)
                 for step, leaf in ((s, l) for s, l in self.p.leaves(lo, hi))
                 for ipa in (step.ipa,)}
        for ipa, leaf in before:
            now = after.get(ipa)
            want_af = leaf.af and op == "test_young"
            import attrs
            if now is None or attrs.evolve(now, af=want_af) != attrs.evolve(leaf, af=want_af) \
                    or now.af != want_af:
                shown = "nothing" if now is None else d.describe(now.encode(), now.level)
                self.fail("aging", f"{op} changed IPA {ipa:#x} from "
                          f"{d.describe(leaf.encode(), leaf.level)} to {shown}: aging may only "
                          "clear AF (rules §9.5 N4)")

    def after_memslot(self, old, new, change: MemslotChange) -> None:
        if change in (MemslotChange.DELETE, MemslotChange.MOVE):
            self._check_unmapped(old.base_gfn << 12, old.end_gfn << 12,
                                 f"after memslot {old.id} {change.value}")
        if new is not None and new.is_logging and not (old is not None and old.is_logging):
            self._check_protected(new, "enabling dirty logging (rules §4.2, §9.4 D1)")

    def after_harvest(self, slot) -> None:
        self._check_protected(slot, "get_dirty_log (rules §4.4, §9.4 D3)")

    def _check_protected(self, slot, why: str) -> None:
        if self.p.vmid_dead:
            return  # as in _check_unmapped: release owns the tables now
        lo, hi = slot.base_gfn << 12, slot.end_gfn << 12
        # Pages a fault of a parallel step has made writable and will mark
        # before it returns (checked when the step quiesces) are exempt.
        dirty = self.p.dirty.get(slot.id, set()) | \
            {gfn for slot_id, gfn in self.pending_dirty if slot_id == slot.id}
        for step, leaf in self.p.leaves(lo, hi):
            if leaf.write and (step.ipa >> 12) not in dirty:
                self.fail("dirty-logging", f"after {why}, stage 2 still maps IPA "
                          f"{step.ipa:#x} writable ({d.describe(step.pte, step.level)})")
        for vcpu, tlb in enumerate(self.p.tlbs):
            for e in tlb.overlapping(lo, hi):
                if e.write and (e.ipa >> 12) not in dirty:
                    self.fail("dirty-logging", f"after {why}, vCPU{vcpu}'s TLB still holds "
                              f"writable {e.describe()} (missing TLB flush)")

    # ------------------------------------------------ cache maintenance (C4)
    def after_vcpu_init(self, vcpu: int) -> None:
        """TVM is armed at every vCPU reset without FWB (rules §6.3, §9.6 C4)."""
        if not self.p.config.fwb and not self.p.tvm[vcpu]:
            self.fail("cache-maintenance",
                      f"vCPU{vcpu} was reset without HCR_EL2.TVM armed (no FWB): the "
                      "guest's SCTLR_EL1 write turning its MMU and caches on will not "
                      "trap, so nothing cleans+invalidates guest RAM at that point "
                      "(rules §6.3, §9.6 C4)")

    def mapped_cacheable(self) -> frozenset[tuple[int, int, int]]:
        """``(ipa, pa, size)`` of every cacheable leaf in the stage-2 tree."""
        if self.p.config.fwb:
            return frozenset()
        return frozenset(
            (step.ipa, leaf.oa, leaf.size)
            for step, leaf in self.p.leaves(0, self.p.geometry.ipa_limit)
            if d.memtype_of(leaf.memattr, False) is d.MemType.NORMAL)

    def check_full_flush(self, before, why: str) -> None:
        """``stage2_flush_vm`` (rules §6.3-§6.5 G-C3, §9.6 C4): every
        cacheable leaf mapped before or after the call was cleaned+invalidated
        to PoC during it. Unmapping instead of cleaning is allowed, since the
        unmap must clean after its TLBI anyway (C3)."""
        if self.p.config.fwb:
            return
        cleaned = _merged(self.p.cleaned)
        for ipa, pa, size in sorted(before | self.mapped_cacheable()):
            missing = _first_gap(cleaned, pa, pa + size)
            if missing is not None:
                self.fail("cache-maintenance",
                          f"{why}, but the candidate returned without cleaning+"
                          f"invalidating PA {missing:#x} (mapped at IPA "
                          f"{ipa + missing - pa:#x}) to PoC: lines the caches hold "
                          "for guest RAM survive the change of cacheability "
                          "(stage2_flush_vm; rules §6.3, §6.5 G-C3, §9.6 C4)")

    def after_destroy(self) -> None:
        p = self.p
        p.grace_period()
        leaked = sorted(pfn for pfn, use in p.mem.use.items()
                        if use in (PageUse.TABLE, PageUse.PGD, PageUse.UNLINKED))
        if leaked:
            pas = ", ".join(f"{pfn << 12:#x}" for pfn in leaked[:4])
            self.fail("table-lifecycle", f"{len(leaked)} table page(s) leaked after "
                      f"destroy(): PA {pas}{' ...' if len(leaked) > 4 else ''}")
        refs = sum(p.host.gup_refs.values())
        if refs:
            self.fail("host-page-refs", f"{refs} GUP reference(s) outstanding after destroy()")


def _grants(x, fault: GuestAbort) -> bool:
    """Does a leaf or a TLB entry allow the access that took ``fault``?"""
    return x.read and (x.write or not fault.write) and (x.exec or not fault.exec)


def _merged(ranges):
    """Sorted, merged ``[start, end)`` intervals."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def _first_gap(merged, start: int, end: int) -> int | None:
    """The first address of ``[start, end)`` no interval covers, else ``None``."""
    for lo, hi in merged:
        if hi <= start:
            continue
        if lo > start:
            return start
        start = hi
        if start >= end:
            return None
    return start if start < end else None
