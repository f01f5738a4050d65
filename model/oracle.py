"""The oracle: what a correct implementation may let the guest and the VMM
observe (DESIGN §3). It never sees page tables, TLBs or physical addresses.

It knows the memslots, the VMM's VMAs, the content of every VMM page, each
vCPU's SCTLR_EL1.{M,C} and TVM promise, and the dirty-log state. Each
operation returns the *set* of observations a correct implementation may
produce; :meth:`Oracle.guest_access` and friends also narrow the state to what
the actual observation reveals.

Rules (reference sections in brackets):

R1 Memory [DESIGN §3]. A page's content is the last value written to it by
   anyone. Migration, KSM merge, THP split/collapse and copy-on-write keep it
   (the host copies through its cacheable alias); after MADV_DONTNEED the next
   touch sees a fresh zeroed page; after munmap a guest access is an EFAULT
   exit until the VMM maps the range again [§5.1].
R2 Exits [§3.1 step 7, §9.2 G4/G6]. No memslot → MMIO exit; a write to a
   read-only memslot → MMIO exit; no VMA, or a write to a read-only VMA →
   EFAULT exit (GUP fails).
R3 Caches [§6.1]. Each page is a set of :class:`model.cache.LineState`
   closed under every free hardware choice (speculative fills, evictions).
   The guest's data accesses are Non-cacheable while its MMU or D-cache is off
   and FEAT_S2FWB is absent; the host is always cacheable.
R4 Maintenance promises [§6.5 G-C1..G-C4]. KVM cleans+invalidates a page to
   PoC when it first becomes guest-accessible and after it is unmapped; it
   flushes all mapped guest RAM when a vCPU toggles SCTLR_EL1.{M,C} while TVM
   is armed (armed at vCPU init, cleared once caches are on [§6.3]) and on the
   first set/way op while TVM is clear (which re-arms it [§6.4]); it
   invalidates the I-cache before a page becomes executable [G-C2]. The
   toggle and set/way flush (G-C3) covers only pages *certainly mapped*: the
   guest accessed the page and has not since accessed another page of its
   2 MiB window, because a fault there may replace a block by a table, and
   KVM's map path drops the rest of the block without any CMO [§2.5, §6.2]
   (:class:`conformance.platform.monitors.Monitors` checks C4 on the tree). A page is
   *exposed* from the first guest access to any gfn in its 2 MiB window of the
   memslot (the largest block a correct candidate could have mapped) until an
   invalidation covers it; the oracle applies G-C1 and G-C2 when exposure
   starts (a candidate may grant execute permission at map time) and G-C4
   when it ends. Between promises anything the hardware may do is
   accepted: this is how "indeterminate" is defined, per page and per
   observer, without ever naming it.
R5 Dirty logging [§4.7, §9.4 D2/D4]. A harvest must report every gfn the guest
   wrote in that slot since logging was enabled or the last harvest; extra
   bits are legal (over-report) and counted. A harvest running concurrently
   with a guest write may miss that write's page (the fault marks it after
   its install [§3.1 step 19]): the page stays due for the next harvest.
R6 Permission upgrades [§5.4, §9.5 N5] are invisible: nothing changes.
R7 Known findings [§6.6, docs/findings.md]. When a candidate that declares
   a known finding shows it on a page, the observation is adopted
   (:meth:`Oracle.adopt_stale_line`) instead of judged; the rules above are
   not relaxed for anything else.
R8 Release [§5.2]. Once the VMM's mm is gone (``exit_mmap`` raised the
   notifier ``release``), no vCPU enters the guest again: every guest access
   is an EFAULT exit.
"""

from __future__ import annotations

import functools

import attrs

from conformance.protocol import SCTLR_C, SCTLR_M, Exit, Memslot, VmConfig
from model import cache
from model.vmas import cut, set_writable
from model.cache import FRESH_ZEROED, LineState

PAGE = 1 << 12
WINDOW_PAGES = 512  # 2 MiB: the largest block the host model can back


@attrs.frozen
class Outcome:
    """One observation: a value, or an exit."""

    exit: Exit | None = None
    value: int | None = None

    def describe(self) -> str:
        return f"value {self.value}" if self.exit is None else f"{self.exit.value} exit"


MMIO = Outcome(exit=Exit.MMIO)
EFAULT = Outcome(exit=Exit.EFAULT)


@attrs.define
class Oracle:
    """The sequential specification's state. Clones compare with ``==``
    (attrs equality over every field): the linearizability search and the
    set of surviving states in a parallel step deduplicate by it."""

    config: VmConfig
    memslots: dict[int, Memslot] = attrs.Factory(dict)
    vmas: list[tuple[int, int, bool]] = attrs.Factory(list)  # (start, end, writable)
    pages: dict[int, frozenset[LineState]] = attrs.Factory(dict)
    ksm: set[int] = attrs.Factory(set)
    sctlr: list[int] = attrs.Factory(list)
    tvm_armed: list[bool] = attrs.Factory(list)
    exposed: set[int] = attrs.Factory(set)
    written: dict[int, set[int]] = attrs.Factory(dict)
    mapped: set[int] = attrs.Factory(set)  # gfns certainly mapped (G-C3)
    released: bool = False  # R8

    def __attrs_post_init__(self):
        n = self.config.nr_vcpus
        if not self.sctlr:  # a new VM, not a clone
            self.sctlr = [0] * n
            self.tvm_armed = [not self.config.fwb] * n  # TVM set at vCPU init [§6.3]

    def clone(self) -> "Oracle":
        return Oracle(self.config, dict(self.memslots), list(self.vmas), dict(self.pages),
                      set(self.ksm), list(self.sctlr), list(self.tvm_armed),
                      set(self.exposed),
                      {k: set(v) for k, v in self.written.items()}, set(self.mapped),
                      self.released)

    # ------------------------------------------------------------ helpers
    def _closed(self, states) -> frozenset[LineState]:
        return _closure(frozenset(states), self.config.idc, self.config.dic)

    def _map(self, hva: int, fn) -> None:
        if hva in self.pages:
            self.pages[hva] = _mapped(fn, self.pages[hva], self.config.idc, self.config.dic)

    def slot_for_gfn(self, gfn: int) -> Memslot | None:
        for slot in self.memslots.values():
            if slot.contains_gfn(gfn):
                return slot
        return None

    def vma_at(self, hva: int):
        for start, end, writable in self.vmas:
            if start <= hva < end:
                return writable
        return None

    def _page(self, hva: int) -> frozenset[LineState]:
        if hva not in self.pages:
            self.pages[hva] = self._closed([FRESH_ZEROED])
        return self.pages[hva]

    def values(self, hva: int, view: str) -> frozenset[int]:
        """What an observer may read: ``cacheable``, ``nc`` or ``exec``."""
        return frozenset(self._read(s, view)[0] for s in self._page(hva))

    def _read(self, s: LineState, view: str):
        if view == "cacheable":
            return cache.cacheable_read(s)
        if view == "nc":
            return cache.nc_read(s), s
        return cache.ifetch(s, idc=self.config.idc, dic=self.config.dic)

    def _observe(self, hva: int, view: str, value: int) -> None:
        """Keep only the states consistent with what was read."""
        kept = [self._read(s, view)[1] for s in self._page(hva)
                if self._read(s, view)[0] == value]
        if kept:
            self.pages[hva] = self._closed(kept)

    def _write(self, hva: int, value: int, cacheable: bool) -> None:
        self._break_cow(hva)
        fn = cache.cacheable_write if cacheable else cache.nc_write
        self.pages[hva] = self._closed(fn(s, value) for s in self._page(hva))

    def _copy(self, hva: int) -> None:
        """The host moved the page: a fresh page written with the content."""
        if hva in self.pages:
            vals = self.values(hva, "cacheable")
            self.pages[hva] = self._closed(
                cache.cacheable_write(LineState(), v) for v in vals)

    def _break_cow(self, hva: int) -> None:
        if hva in self.ksm:
            self.ksm.discard(hva)
            self.invalidate(hva, hva + PAGE)
            self._copy(hva)

    def guest_cacheable(self, vcpu: int) -> bool:
        bits = SCTLR_M | SCTLR_C
        return self.config.fwb or (self.sctlr[vcpu] & bits) == bits

    # ----------------------------------------------------- R4: exposure
    def _window(self, slot: Memslot, gfn: int):
        base = gfn - gfn % WINDOW_PAGES
        return range(max(base, slot.base_gfn), min(base + WINDOW_PAGES, slot.end_gfn))

    def _expose(self, slot: Memslot, gfn: int) -> None:
        """A page may be mapped — and executable: KVM grants X lazily, but a
        candidate may grant it at map time (as KVM does with DIC), so the
        I-cache promise (G-C2) is also taken at first access."""
        if gfn in self.exposed:
            return
        for g in self._window(slot, gfn):
            if g not in self.exposed:
                self.exposed.add(g)
                hva = slot.gfn_to_hva(g)
                if self.vma_at(hva) is not None:
                    self._page(hva)  # the host would zero it on first touch
                self._map(hva, _maintain)  # G-C1, G-C2

    def _unexpose(self, slot: Memslot, gfns) -> None:
        for g in gfns:
            self.mapped.discard(g)
            if g in self.exposed:
                self.exposed.discard(g)
                self._map(slot.gfn_to_hva(g), cache.clean_inval)  # G-C4

    def _flush_mapped(self) -> None:
        """``stage2_flush_vm``: clean+invalidate all mapped guest RAM (G-C3)."""
        for g in sorted(self.mapped):
            slot = self.slot_for_gfn(g)
            if slot is not None:
                self._map(slot.gfn_to_hva(g), cache.clean_inval)

    # --------------------------------------------------------- guest ops
    def guest_access(self, vcpu: int, gfn: int, kind: str, value: int | None,
                     observed: Outcome | None = None) -> frozenset[Outcome]:
        """Allowed outcomes of a guest ``read``/``write``/``exec`` of ``gfn``;
        with ``observed`` (when allowed) the state moves on accordingly."""
        allowed = self._access_outcomes(vcpu, gfn, kind, value)
        if observed is not None and observed in allowed:
            self._commit_access(vcpu, gfn, kind, value, observed)
        return allowed

    def _access_outcomes(self, vcpu, gfn, kind, value) -> frozenset[Outcome]:
        if self.released:
            return frozenset([EFAULT])  # R8
        slot = self.slot_for_gfn(gfn)
        if slot is None or (kind == "write" and slot.readonly):
            return frozenset([MMIO])  # R2
        hva = slot.gfn_to_hva(gfn)
        writable = self.vma_at(hva)
        if writable is None or (kind == "write" and not writable):
            return frozenset([EFAULT])
        if kind == "write":
            return frozenset([Outcome(value=value)])
        states = self._page(hva)
        if gfn not in self.exposed:
            states = self._closed(_maintain(s) for s in states)
        view = "exec" if kind == "exec" else (
            "cacheable" if self.guest_cacheable(vcpu) else "nc")
        return frozenset(Outcome(value=self._read(s, view)[0]) for s in states)

    def _commit_access(self, vcpu, gfn, kind, value, observed: Outcome) -> None:
        if observed.exit is not None:
            return
        slot = self.slot_for_gfn(gfn)
        hva = slot.gfn_to_hva(gfn)
        if kind == "write":
            self._break_cow(hva)
        self._page(hva)
        self._expose(slot, gfn)
        self.mapped.difference_update(self._window(slot, gfn))
        self.mapped.add(gfn)
        cacheable = self.guest_cacheable(vcpu)
        if kind == "write":
            self._write(hva, value, cacheable)
            if slot.is_logging:
                self.written.setdefault(slot.id, set()).add(gfn)
        else:
            view = "exec" if kind == "exec" else ("cacheable" if cacheable else "nc")
            self._observe(hva, view, observed.value)

    def write_sctlr(self, vcpu: int, new: int) -> None:
        bits = SCTLR_M | SCTLR_C
        was_on = (self.sctlr[vcpu] & bits) == bits
        now_on = (new & bits) == bits
        self.sctlr[vcpu] = new
        if self.config.fwb or not self.tvm_armed[vcpu]:
            return
        if was_on != now_on:
            self._flush_mapped()  # kvm_toggle_cache [§6.3]
        if now_on:
            self.tvm_armed[vcpu] = False

    def set_way(self, vcpu: int) -> None:
        if self.config.fwb:
            return  # ignored with FWB [§6.4]
        if not self.tvm_armed[vcpu]:
            self._flush_mapped()
            self.tvm_armed[vcpu] = True

    # ----------------------------------------------------------- host ops
    def vmm_write(self, hva: int, value: int) -> bool:
        if not self.vma_at(hva):
            return False
        self._write(hva, value, cacheable=True)
        return True

    def vmm_read(self, hva: int, observed: int | None = None) -> frozenset[int]:
        allowed = self.values(hva, "cacheable")
        if observed is not None and observed in allowed:
            self._observe(hva, "cacheable", observed)
        return allowed

    def release(self) -> None:
        """R8: the notifier ``release`` (``exit_mmap``): no guest access from now on."""
        self.released = True

    def adopt_stale_line(self, hva: int, value: int) -> None:
        """R7, finding ``block-split-no-cmo``: an observer read ``value``, a
        stale clean line the candidate never cleaned (or a copy the host made
        from it). From now on the page either still has that clean line above
        what memory holds, or holds ``value`` itself."""
        below = [attrs.evolve(s, dline=value, dirty=False) for s in self._page(hva)]
        self.pages[hva] = self._closed(below + [LineState(mem=value, dline=value)])

    def invalidate(self, start: int, end: int) -> None:
        """An MMU-notifier invalidation of VMM range ``[start, end)``."""
        for slot in self.memslots.values():
            lo, hi = max(start, slot.userspace_addr), min(end, slot.hva_end)
            if lo < hi:
                self._unexpose(slot, range(slot.hva_to_gfn(lo), slot.hva_to_gfn(hi - 1) + 1))

    def _pages_in(self, start: int, end: int) -> list[int]:
        return [h for h in self.pages if start <= h < end]

    def host_op(self, op: str, start: int, end: int, other: int | None = None) -> None:
        """Apply a host mm operation whose notifier range is ``[start, end)``."""
        if op != "mprotect_rw":
            self.invalidate(start, end)  # R6: upgrades invalidate nothing
        if op == "ksm_merge":
            self.invalidate(other, other + PAGE)  # the kept page is write-protected
        if op in ("munmap", "madvise_dontneed"):
            for h in self._pages_in(start, end):
                del self.pages[h]
                self.ksm.discard(h)
            if op == "munmap":
                self.vmas = cut(self.vmas, start, end)
        elif op in ("migrate", "thp_collapse"):
            for h in self._pages_in(start, end):
                self._copy(h)
                if op == "thp_collapse":
                    self.ksm.discard(h)
        elif op in ("mprotect_ro", "mprotect_rw"):
            self.vmas = set_writable(self.vmas, start, end, op == "mprotect_rw")
        elif op == "ksm_merge":
            self.pages[start] = self._page(other)
            self.ksm |= {start, other}

    def can_ksm_merge(self, keep: int, merge: int) -> bool:
        """KSM only merges pages whose contents are identical."""
        if keep == merge or not self.vma_at(keep) or not self.vma_at(merge):
            return False
        a, b = self.values(keep, "cacheable"), self.values(merge, "cacheable")
        return len(a) == 1 and a == b

    def mmap(self, start: int, end: int) -> None:
        self.vmas.append((start, end, True))

    # ----------------------------------------------------------- memslots
    def set_memslot(self, old: Memslot | None, new: Memslot | None) -> None:
        if old is not None:
            del self.memslots[old.id]
            moved = new is None or new.base_gfn != old.base_gfn
            if moved:
                self._unexpose(old, range(old.base_gfn, old.end_gfn))
        if new is not None:
            self.memslots[new.id] = new
            if new.is_logging and not (old is not None and old.is_logging):
                self.written[new.id] = set()
            elif new.is_logging:  # MOVE keeps the dirty bitmap, slot-relative
                self.written[new.id] = {g - old.base_gfn + new.base_gfn
                                        for g in self.written.get(old.id, ())}
        if new is None or not new.is_logging:
            self.written.pop((old or new).id, None)

    def harvest(self, slot: Memslot, reported: frozenset[int],
                in_flight: frozenset[int] = frozenset()) -> tuple[frozenset, frozenset]:
        """Returns (missing, extra) against R5; then starts a new round.

        ``in_flight``: gfns a write fault running concurrently with the
        harvest may not have marked yet (``user_mem_abort`` marks the page
        after it installs the writable leaf and drops mmu_lock): this
        harvest may miss them, and they stay due for the next one."""
        written = self.written.get(slot.id, set())
        missing = frozenset(written - reported - in_flight)
        extra = frozenset(reported - written)
        self.written[slot.id] = (written & in_flight) - reported
        return missing, extra


def _maintain(s: LineState) -> LineState:
    """What KVM does before a page becomes guest-accessible (G-C1, G-C2)."""
    return cache.iinval(cache.clean_inval(s))


@functools.lru_cache(maxsize=8192)
def _mapped(fn, states: frozenset, idc: bool, dic: bool) -> frozenset[LineState]:
    """``fn`` applied to every state, closed again. Most pages share a few state
    sets (a 2 MiB window exposed at once is 512 fresh pages), so this is
    memoised, like :func:`_closure`."""
    return _closure(frozenset(fn(s) for s in states), idc, dic)


@functools.lru_cache(maxsize=4096)
def _closure(states: frozenset, idc: bool, dic: bool) -> frozenset[LineState]:
    return cache.hw_closure(states, idc=idc, dic=dic)
