"""Boot: the VM, its layout and its warm start, step 1 of every program.

A warm start (``Layout.start``) brings the VM to a running, migrating or
migrated state through the candidate, checked like any other step; each part
of it is named in the step label (``1: boot (...): vCPU0 writing ...``), so a
failure inside boot says where.
"""

from __future__ import annotations

import attrs

from conformance.machines.steps import PTRS_PER_TABLE, SCTLR_FOR, _slot_relative, _spread, note
from conformance.platform.core import Platform
from conformance.protocol import Memslot, MemslotChange
from model.host import THP_SIZE
from model.oracle import Oracle
from strategies.layouts import interesting_gfns


class Boot:
    """The boot part of :class:`~conformance.machines.sequential.Stage2Machine`
    (a mixin: the state lives on the machine)."""

    def _boot(self, config, layout):
        note(f"config: {config}")
        note(f"layout: {layout.describe()}")
        self.layout = layout
        # The pool is kept per memslot (slot id, page offset) so that it follows
        # a moved slot; a gfn outside every slot stays an absolute MMIO probe.
        self.gfns = [_slot_relative(layout.memslots, g) for g in interesting_gfns(layout)]
        self.deleted: dict[int, Memslot] = {}
        self.platform = p = Platform(config)
        self.oracle = Oracle(config)
        self.slots = {s.id: s for s in layout.memslots}
        for v in layout.vmas:
            p.host_mmap(v.start, v.end, v.thp)
            self.oracle.mmap(v.start, v.end)
        self._boot_phase("constructing the candidate and its vCPUs")
        p.candidate = p.construct(self.candidate_cls)
        for vcpu in range(config.nr_vcpus):
            p.vcpu_init(vcpu)
        self._boot_phase("creating the memslots")
        for slot in layout.memslots:
            first = slot if layout.start == "cold" else attrs.evolve(slot, log_dirty_pages=False)
            p.set_memslot(None, first, MemslotChange.CREATE)
            self.oracle.set_memslot(None, first)
            self.slots[slot.id] = first
        if layout.start != "cold":
            self._warm_up(layout)
        slot0, vma0 = layout.memslots[0], layout.vmas[0]
        congruent = (slot0.userspace_addr - (slot0.base_gfn << 12)) % THP_SIZE == 0
        self._event("layout: slot 0 " + ("THP-backed" if vma0.thp else "not THP-backed")
                    + (", gfn/hva congruent" if congruent else ", gfn/hva misaligned"))

    def _warm_up(self, layout):
        """Bring the VM to ``layout.start`` (see :class:`strategies.layouts.Layout`)."""
        sid = layout.memslots[0].id

        def set_logging(on):
            cur = self.slots[sid]
            self._change(cur, attrs.evolve(cur, log_dirty_pages=on), MemslotChange.FLAGS_ONLY)

        self._boot_phase(f"vCPU0 reading 8 pages of every 2 MiB window of slot {sid}")
        self._touch_windows(self.slots[sid], "read")
        if layout.caches_on:
            self._boot_phase("every vCPU turning its MMU and caches on")
            for vcpu in range(self.platform.config.nr_vcpus):
                self._write_sctlr(vcpu, SCTLR_FOR["caches on"])
        if layout.start in ("migrating", "migrated"):
            self._boot_phase(f"slot {sid} logging on")
            set_logging(True)
            self._boot_phase(f"vCPU0 writing the same pages of slot {sid}")
            self._touch_windows(self.slots[sid], "write")
            if layout.start == "migrated":
                self._boot_phase(f"slot {sid} logging off")
                set_logging(False)
        self._boot_phase("setting the memslot flags the layout has")
        for slot in layout.memslots:
            if self.slots[slot.id] != slot:
                self._change(self.slots[slot.id], slot, MemslotChange.FLAGS_ONLY)

    def _boot_phase(self, what: str) -> None:
        """Name the part of boot now running in the step label, so that a
        failure inside a warm start says where (``1: boot (...): what``)."""
        self.platform.step = f"{self.trace[-1]}: {what}"

    def _touch_windows(self, slot, kind):
        """vCPU0 accesses 8 pages spread over every 2 MiB window of ``slot``."""
        window = slot.base_gfn & ~(PTRS_PER_TABLE - 1)
        for base in range(window, slot.end_gfn, PTRS_PER_TABLE):
            for gfn in _spread(base, 8):
                if slot.contains_gfn(gfn):
                    self._guest_access_gfn(0, gfn, kind)

    # ------------------------------------------------ addresses and memslots
    def _vcpu(self, vcpu: int) -> int:
        return vcpu % self.platform.config.nr_vcpus

    def _gfn(self, where: int) -> int:
        slot_id, gfn = self.gfns[where % len(self.gfns)]
        if slot_id is None:
            return gfn
        slot = self.slots.get(slot_id) or self.deleted[slot_id]
        return slot.base_gfn + gfn

    def _hva(self, where: int) -> int | None:
        gfn = self._gfn(where)
        slot = self.platform.slot_for_gfn(gfn)
        return None if slot is None else slot.gfn_to_hva(gfn)

    def _value(self, origin: str) -> int:
        self.next_value += 1
        self.origin[self.next_value] = f"{origin} in step {self.steps}"
        return self.next_value

    def _slot(self, which: int) -> Memslot:
        ids = sorted(self.slots)
        return self.slots[ids[which % len(ids)]]

    def _change(self, old, new, change):
        self.platform.set_memslot(old, new, change)
        self.oracle.set_memslot(old, new)
        if new is None:
            self.deleted[old.id] = old
            del self.slots[old.id]
        else:
            self.slots[new.id] = new

    def _memslot_delete(self, which):
        old = self._slot(which)
        self._change(old, None, MemslotChange.DELETE)

    def _memslot_recreate(self, which):
        if not self.deleted:
            return
        ids = sorted(self.deleted)
        slot = self.deleted.pop(ids[which % len(ids)])
        slot = Memslot(slot.id, slot.base_gfn, slot.npages, slot.userspace_addr,
                       slot.readonly, False)
        self._change(None, slot, MemslotChange.CREATE)

    def _memslot_move(self, which):
        old = self._slot(which)
        original = next(s for s in self.layout.memslots if s.id == old.id)
        base = original.base_gfn if old.base_gfn != original.base_gfn else \
            original.base_gfn + 0x10000
        new = Memslot(old.id, base, old.npages, old.userspace_addr, old.readonly,
                      old.log_dirty_pages)
        self._change(old, new, MemslotChange.MOVE)

