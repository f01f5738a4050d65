"""``kvm-parallel``: kvm-classic plus the two parallel paths KVM/arm64 v6.12
does not have: a resumable unmap and "fast" (mmu_lock-free) fault fix-ups.

What it does, in the rules' terms (everything else is
:class:`~candidates.classic.ClassicCandidate`):

* **Resumable unmap** (rules §5.2, §5.3, L4). Notifier unmaps
  (``unmap_gfn_range``) and memslot DELETE/MOVE unmaps go through
  :meth:`KvmParallelCandidate.stage2_apply_range`, KVM's
  ``stage2_apply_range`` with ``resched`` set (the arm64 counterpart of x86's
  ``kvm_tdp_mmu_zap_leafs``, which yields the same way): the range is walked
  in 1 GiB chunks (``stage2_range_addr_end``), and between two chunks
  ``cond_resched_rwlock_write`` drops ``mmu_lock`` (``write_unlock``,
  ``cpu_relax``, ``write_lock``) so that waiting faults run. Every chunk's
  unmap finishes its TLB invalidation (and, without FWB, its CMOs) before the
  lock is dropped. After retaking the lock the loop re-reads the root, which
  ``release`` may have detached meanwhile, and stops if it is gone (the 2017
  use-after-free, rules §8 bug 1). Faults that run between two chunks see
  ``mmu_invalidate_in_progress`` and retry (the slow path), or only relax
  leaves that the next chunks remove anyway (the fast path).
* **Fast access-flag faults** (``handle_access_fault`` →
  ``kvm_pgtable_stage2_mkyoung``, rules §3.6): under ``rcu_read_lock()``
  alone, no ``mmu_lock``: one shared walk, ``cmpxchg`` of the leaf to
  ``leaf | AF``. No TLBI: an AF=0 entry is never cached (rules §1.5 rule 1).
  A lost race just resumes the guest, which refaults if it still needs to.
* **Fast write-protection faults** (``kvm_pgtable_stage2_relax_perms`` without
  ``mmu_lock`` and without GUP): a write permission fault on a present leaf
  that is eligible (below) is fixed under RCU alone by ``cmpxchg`` of the
  leaf to ``leaf | S2AP_W``, then the local TLBI by IPA at the leaf's level
  (``__kvm_tlb_flush_vmid_ipa_nsh``), then, in a logging slot, the dirty mark
  (after the writable install, before the vCPU resumes, rules §9.4 D2). A
  leaf found already writable (another vCPU won) gets the local TLBI alone;
  a lost ``cmpxchg`` gets the local TLBI with the level unknown and resumes,
  as ``relax_perms`` does on ``-EAGAIN`` since Sep 2023 (rules §8 bug 14):
  the guest retries and the next fault decides again. Anything not eligible
  (an exec fault, an invalid or LOCKED entry, no SW bit, a block in a logging
  slot) takes kvm-classic's path: GUP, ``mmu_lock`` for read, ``map`` or
  ``relax_perms``.

**How "host-writable" is known without GUP.** A leaf carries software bit
SW0 (descriptor bit 55, :data:`SW_HOST_WRITABLE`; ``model.descriptors``
decodes the SW field and the monitors count SW bits as attribute-only,
rules §1.2, §1.5 rule 2) when the fault that installed it, or last relaxed
it, made it *writable*: that fault's GUP saw a writable host PTE, the slot
was not read-only, and its ``mmu_invalidate_retry`` check passed under the
lock. ``wrprotect`` (logging on, harvests) clears S2AP_W and keeps SW0, so
the bit is exactly x86's "host-writable" SPTE bit. It stays true for as long
as the leaf exists: every host change that can make the page read-only
(``mprotect``, a KSM merge, migration, a THP split, CoW) goes through
``invalidate_range_start``, which unmaps the leaf, SW0 with it (rules §5.1,
§9.5 N1), and a host *upgrade* (§5.4) only makes it more true. So a present
leaf with SW0 may be made writable again without asking the host. The rest
of the eligibility: the slot is not read-only (it is never writable then,
rules §9.2 G3), and in a logging slot only a 4 KiB leaf (a block must be
split, §4.3, §9.4 D5). Read faults in a logging slot still map without SW0
(the fault path does not pass the GUP answer to ``map``), so the first write
to such a page takes the slow path once; every write after each harvest is
fast, which is the dirty-logging loop of a migration.

**What lockless writers cost the rest of the design.** ``mmu_lock`` no longer
excludes every writer of a leaf, nor every reader of a table:

* the exclusive read-modify-writes of a leaf, ``wrprotect`` and aging's
  ``test_clear_young``, use ``cmpxchg`` and retry instead of a plain store,
  so that they neither undo a concurrent fast relaxation (aging may only clear
  AF, rules §9.5 N4) nor lose an AF update;
* an unmap that prunes an empty table frees it after an RCU grace period
  (``call_rcu``), not at once: a lockless walker may be inside it (rules §7.3,
  L2; x86's TDP MMU frees its page tables the same way for its
  ``fast_page_fault``);
* ``release`` (``kvm_mmu_notifier_release`` → ``kvm_arch_flush_shadow_all`` →
  ``kvm_free_stage2_pgd``) still detaches the root under the write lock, and
  destroys the detached table outside the lock, but after a grace period:
  the lock no longer orders it against fast faults, RCU does.

**The seeds, in our words.** Seed 000 (Sean Christopherson asking whether arm64
would get x86-style fast page faults; Ricardo Koller and Oliver Upton): access
faults are trivial to do locklessly but matter little, since most large
machines set AF in hardware (FEAT_HAFDBS); write-protection faults are the
interesting case, and they pay less than on x86 because arm64 may cache the
very translation that took the permission fault (rules §1.5 rule 1), so the
fix-up is not complete until the faulting CPU invalidated its own TLB entry.
The saving is ``mmu_lock`` and the GUP round trip, not the TLBI. Seed 002
(Sean, Will Deacon, Alexandru Elisei): KVM registers an MMU notifier whose
``release`` runs from ``exit_mmap`` and tears stage 2 down by nulling the
root; arm64 gets away without more because ``exit_mmap`` runs only once no
vCPU thread holds the mm, whereas x86 keeps the fault path robust against the
root vanishing. A walker that drops ``mmu_lock`` between chunks, and a fault
path that never takes it, cannot lean on that argument: both re-read the root
(under the lock after each reschedule, under RCU for the fast paths) and cope
with it being gone, and the detached tables live until every RCU reader that
could see them has left.
"""

from __future__ import annotations

from candidates.classic import ClassicCandidate
from candidates.pgtable import (
    EAGAIN, EINVAL, HANDLE_FAULT, LAST_LEVEL, LEAF, SHARED, Ctx, Stage2PgTable)
from conformance.protocol import (
    PAGE_SIZE, Exit, FaultKind, GuestAbort, Memslot)
from model import descriptors as d
from model.geometry import MIN_BLOCK_LEVEL, granule

#: Software bit SW0 (descriptor bit 55): "made writable by a fault whose GUP
#: saw a writable host page" (see the module docstring).
SW_HOST_WRITABLE = 1 << d.SW_SHIFT
#: ``kvm_granule_size(KVM_PGTABLE_MIN_BLOCK_LEVEL)``: the resched chunk.
CHUNK = granule(MIN_BLOCK_LEVEL)
#: ``update_leaf_lockless``: the leaf was not eligible (nothing stored).
INELIGIBLE = 1


def stage2_range_addr_end(addr: int, end: int) -> int:
    """``stage2_range_addr_end``: the next 1 GiB boundary after ``addr``, or
    ``end`` if that comes first."""
    boundary = (addr + CHUNK) & ~(CHUNK - 1)
    return boundary if boundary - 1 < end - 1 else end


def _same_but_perms(old: int, new: int) -> bool:
    """``!stage2_pte_needs_update`` with SW bits ignored too: both valid and
    differing at most in S2AP/XN and the software bits (so that a map racing
    another fault's install never breaks a leaf for its SW0 alone)."""
    return d.is_valid(old) and d.is_valid(new) and \
        not (old ^ new) & ~(d.S2_PERMS | d.SW_MASK)


class ParallelStage2PgTable(Stage2PgTable):
    """:class:`~candidates.pgtable.Stage2PgTable` for a VM whose faults may
    change leaves without ``mmu_lock``: writable leaves carry SW0, exclusive
    read-modify-writes of a leaf use ``cmpxchg``, pruned tables are freed
    after a grace period, and a lockless one-leaf update walk."""

    # ------------------------------------------------------------- map
    # kvm-classic's map walker (``stage2_map_walker``), except that a writable
    # leaf is built with SW0 (``stage2_set_prot_attr`` copies the
    # ``KVM_PGTABLE_PROT_SW*`` bits) and that a permission- or SW-only
    # difference is left alone (``-EAGAIN``) like a permission-only one.
    def leaf_sw_bits(self, prot: d.Prot) -> int:
        return SW_HOST_WRITABLE if d.Prot.W in prot else 0

    def leave_alone(self, old: int, new: int) -> bool:
        return _same_but_perms(old, new)

    def relax_attrs(self, prot: d.Prot) -> tuple[int, int]:
        """The slow path's ``relax_perms`` (under the read lock after GUP):
        granting W also sets SW0."""
        set_, clr = super().relax_attrs(prot)
        return (set_ | SW_HOST_WRITABLE if d.Prot.W in prot else set_), clr

    # ------------------------------------------- the lockless update walk
    def update_leaf_lockless(self, addr: int, fixup) -> tuple[int, int | None, bool]:
        """One-page ``SHARED | HANDLE_FAULT`` walk (under RCU, no ``mmu_lock``):
        at the entry that maps ``addr``, ``fixup(old, level)`` returns the new
        value, or ``None`` if the entry is not eligible; a different value is
        stored with ``cmpxchg`` from ``old``. Returns ``(ret, level, stored)``:
        ``ret`` 0 (stored, or already as wanted), ``EAGAIN`` (the ``cmpxchg``
        lost a race) or :data:`INELIGIBLE`."""
        out = [INELIGIBLE, None, False]

        def cb(ctx: Ctx, visit: int) -> int:
            out[1] = ctx.level
            new = fixup(ctx.old, ctx.level)
            if new is None:
                return 0
            if new != ctx.old and not self.try_set_pte(ctx, new):
                out[0] = EAGAIN
                return EAGAIN
            out[0], out[2] = 0, new != ctx.old
            return 0

        self.walk(addr, PAGE_SIZE, cb, SHARED | HANDLE_FAULT | LEAF)
        return out[0], out[1], out[2]

    # ------------------------- exclusive walks that lockless writers race
    def _atomic_update(self, ptep: int, old: int, level: int, change) -> int:
        """``cmpxchg`` ``old`` to ``change(old)`` until it sticks (a fast
        fault may have changed the leaf's attributes since it was read);
        stops when the entry is no longer a leaf or needs no change.
        Returns the value last replaced (or found)."""
        svc = self.svc
        while d.is_leaf(old, level):
            new = change(old)
            if new == old:
                return old
            cur = svc.cmpxchg_pte(ptep, old, new)
            if cur == old:
                return old
            old = cur
        return old

    def wrprotect(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_wrprotect``: clear S2AP_W (SW0 stays); no TLBI."""
        def cb(ctx: Ctx, visit: int) -> int:
            self._atomic_update(ctx.ptep, ctx.old, ctx.level, lambda pte: pte & ~d.S2AP_W)
            return 0

        return self.walk(addr, size, cb, LEAF)

    def test_clear_young(self, addr: int, size: int, mkold: bool) -> bool:
        """``kvm_pgtable_stage2_test_clear_young``: AF cleared by ``cmpxchg``
        (only AF: a concurrent fast relaxation is kept); no TLBI."""
        young = [False]

        def cb(ctx: Ctx, visit: int) -> int:
            if not d.is_valid(ctx.old) or not ctx.old & d.AF:
                return 0
            young[0] = True
            if mkold:
                self._atomic_update(ctx.ptep, ctx.old, ctx.level, lambda pte: pte & ~d.AF)
            return 0

        self.walk(addr, size, cb, LEAF)
        return young[0]

    # ============================================================== unmap
    def free_pruned_table(self, child: int) -> None:
        """An empty table the unmap prunes is freed after an RCU grace
        period: a fast fault may be walking it without ``mmu_lock``."""
        self.svc.call_rcu(lambda: self.svc.put_page(child))


def _unmap(pgt: Stage2PgTable, addr: int, size: int) -> int:
    return pgt.unmap(addr, size)


class KvmParallelCandidate(ClassicCandidate):
    """``kvm-parallel``: see the module docstring."""

    version = "kvm-arm64-v6.12-parallel/1"
    pgtable_cls = ParallelStage2PgTable

    # ================================================ resumable unmap (§5.2)
    def cond_resched_rwlock_write(self) -> None:
        """Let the waiters of ``mmu_lock`` in (always, not only on contention)."""
        svc = self.services
        svc.write_unlock()
        svc.cpu_relax()
        svc.write_lock()

    def stage2_apply_range(self, addr: int, end: int, fn) -> int:
        """``stage2_apply_range(mmu, addr, end, fn, resched=true)``, with the
        write lock held: ``fn(pgt, start, size)`` per 1 GiB chunk, dropping the
        lock between chunks and re-reading the root after retaking it;
        ``-EINVAL`` when the root is gone (``release`` detached it)."""
        while True:
            pgt = self.pgt
            if pgt is None:
                return EINVAL
            next_ = stage2_range_addr_end(addr, end)
            ret = fn(pgt, addr, next_ - addr)
            if ret or next_ == end:
                return ret
            self.cond_resched_rwlock_write()
            addr = next_

    def unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> None:
        """``kvm_unmap_gfn_range`` → ``__unmap_stage2_range(may_block=true)``
        (the caller, ``invalidate_range_start``, holds the write lock)."""
        self.stage2_apply_range(start << 12, end << 12, _unmap)

    def flush_shadow_memslot(self, old: Memslot) -> None:
        """``kvm_arch_flush_shadow_memslot``, resumable too."""
        with self.services.mmu_write_lock():
            self.stage2_apply_range(old.base_gfn << 12, old.end_gfn << 12, _unmap)

    def release(self) -> None:
        """``kvm_free_stage2_pgd``: detach the root under the write lock; destroy
        it outside the lock once every RCU reader (a fast fault) has left."""
        svc = self.services
        with svc.mmu_write_lock():
            pgt, self.pgt = self.pgt, None
        if pgt is not None:
            svc.call_rcu(pgt.destroy)

    # ============================================== fast fault paths (§3)
    def handle_access_fault(self, fault: GuestAbort) -> Exit:
        """``handle_access_fault`` without ``mmu_lock``: ``mkyoung`` under RCU
        alone (``cmpxchg`` of AF, no TLBI); a lost race resumes the guest."""
        with self.services.rcu_read_lock():
            pgt = self.pgt
            if pgt is not None:
                pgt.update_leaf_lockless(
                    fault.ipa, lambda old, level: old | d.AF if d.is_leaf(old, level) else None)
        return Exit.RESUME

    def user_mem_abort(self, fault: GuestAbort, slot: Memslot) -> Exit:
        """A write-protection fault the fast path can fix needs no GUP and no
        ``mmu_lock``; everything else is kvm-classic's ``user_mem_abort``."""
        if fault.kind is FaultKind.PERMISSION and fault.is_write_fault \
                and not fault.is_exec_fault and not slot.readonly \
                and self.fast_page_fault(fault, slot):
            return Exit.RESUME
        return super().user_mem_abort(fault, slot)

    def fast_page_fault(self, fault: GuestAbort, slot: Memslot) -> bool:
        """Relax the leaf to writable under RCU alone, if eligible (module
        docstring); ``False`` sends the fault down the slow path."""
        svc = self.services
        logging = slot.is_logging

        def fixup(old: int, level: int) -> int | None:
            if not d.is_leaf(old, level) or not old & SW_HOST_WRITABLE:
                return None  # invalid, LOCKED, or never proven host-writable
            if logging and level != LAST_LEVEL:
                return None  # a block in a logging slot must be split
            return old | d.S2AP_W  # == old: another vCPU relaxed it first

        with svc.rcu_read_lock():
            pgt = self.pgt
            if pgt is None:
                return False
            ret, level, stored = pgt.update_leaf_lockless(fault.ipa, fixup)
        if ret == INELIGIBLE:
            return False
        # arm64 may cache the translation that faulted (rules §1.5 rule 1):
        # drop this CPU's copy, also when nothing was stored (§7.5, §8 bug 14).
        svc.tlb_flush_vmid_ipa_nsh(fault.ipa, level if ret == 0 else None)
        if stored and logging:
            svc.mark_page_dirty(slot, fault.gfn)  # after the install, before resuming
        return True
