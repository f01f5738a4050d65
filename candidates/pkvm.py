"""``kvm-pkvm``: kvm-classic redesigned for a hypervisor without RCU (pKVM at EL2).

At EL2 there is no RCU: ``kvm_pgtable_walk_begin`` refuses ``SHARED`` walks
with ``-EPERM`` when built for the hypervisor, and a table that a parallel
walker may still be inside cannot be handed to ``call_rcu``
(``free_unlinked_table``). The seeds (000: "Protect stage-2 traversal with
RCU"; 001: "Parallelize stage 2 fault handling", Oliver Upton and Quentin
Perret, Apr-May 2022) offer three ways out:

1. a rwlock with unmap on the write side and everything else on the read
   side, and **no table collapse**: turning dirty logging off unmaps the
   slot's range instead, and the guest refaults it as blocks;
2. walkers with interrupts off, and removed tables freed only after an IPI
   to every CPU has come back (a home-made grace period);
3. walkers that take a reference on every table page on the way down.

This candidate is design 1. What it does, in the reference's terms:

* the same fault path, walker and policies as ``kvm-classic``
  (:class:`~candidates.classic.ClassicCandidate`, rules §2-§6): faults under
  the read side of ``mmu_lock``, ``cmpxchg`` break-before-make with the
  LOCKED marker, 2 MiB blocks for THP-backed congruent slots, ``relax_perms``
  with a local TLBI, ``mkyoung``, lazy exec, deferred range TLBI on unmap with
  FWB, TVM and ``stage2_flush_vm``;
* **no RCU anywhere**: shared walks (``map``, ``relax_perms``, ``mkyoung``
  from the fault path, flags ``SHARED | HANDLE_FAULT``) still use ``cmpxchg``
  against each other but take no ``rcu_read_lock``
  (:meth:`PkvmPgTable.walk`), and nothing calls ``call_rcu``;
* **no table is ever unlinked under the read lock**, so no reader can be
  inside a table when it is freed: the map walker's ``TABLE_PRE`` visit never
  collapses a table into a block (:meth:`PkvmPgTable._map_walker`). When a
  table is in the way of the 2 MiB block the fault path asked for, the fault
  is served at 4 KiB instead: the faulting page is mapped in the existing
  table (or its permissions relaxed, for a permission fault), exactly what
  ``user_mem_abort`` does for a 4 KiB ``vma_pagesize`` (:meth:`PkvmPgTable.map`);
* tables are unlinked and freed only under the write lock, and at once: the
  empty tables ``kvm_pgtable_stage2_unmap`` prunes (MMU notifiers, memslot
  delete/move, logging off) and the whole tree in ``release`` (here
  ``kvm_pgtable_stage2_destroy`` runs under the write lock too, as
  ``__pkvm_teardown_vm`` → ``reclaim_guest_pages`` destroys the guest
  stage 2 under ``guest_lock_component``). The one page a reader frees is a
  table it allocated and lost the ``cmpxchg`` race to install: never
  published, so nobody can be inside it (``stage2_map_walk_leaf`` puts
  ``childp`` the same way; pKVM would return it to the vCPU's memcache);
* dirty logging off (``kvm_arch_commit_memory_region``, FLAGS_ONLY) unmaps
  the slot's range under the write lock (:meth:`PkvmCandidate.disable_logging`),
  the replacement seed 001 proposes for lazy collapse: the 4 KiB pages and
  their tables go, and the next fault in each 2 MiB window maps a block.

Why design 1. It is the one the seeds leave standing for pKVM ("If not I
think it is possible to get away with a rwlock with unmap on the write side
and everything else on the read side", Upton, seed 001), and the closest to
what pKVM does today: since v6.14 the hypervisor owns non-protected guests'
stage 2 and maps through ``__pkvm_host_share_guest``
(``arch/arm64/kvm/hyp/nvhe/mem_protect.c``), which calls
``kvm_pgtable_stage2_map(&vm->pgt, ipa, PAGE_SIZE, phys, prot,
&vcpu->vcpu.arch.pkvm_memcache, 0)`` — an exclusive walk — under
``guest_lock_component(vm)``, a ``hyp_spin_lock`` on the VM; the host side
(``kvm_fault_lock``) takes ``mmu_lock`` for write. Design 1 is that lock made
a rwlock so that faults run in parallel again. Design 2 cannot be written
honestly against the platform: there is no interrupt masking or IPI service,
and the only deferral the platform offers is ``call_rcu`` itself. Design 3
needs a reference that can be taken on a page only while it is still linked
(``get_page_unless_zero`` and a re-read of the parent entry): ``get_page`` of
a page a collapse has just freed is a use after free, which is the race
Perret could not close in the thread; it would also break the invariant
``refcount = 1 + live entries`` that ``unmap`` uses to find empty tables.

What of pKVM it leaves out:

* the host stage 2 that pKVM keeps for the host kernel: an identity map
  (``host_stage2_idmap``, ``KVM_PGTABLE_S2_IDMAP``, ``KVM_PGTABLE_S2_NOFWB``)
  with page ownership recorded in software bits (``PKVM_PAGE_OWNED``,
  ``SHARED_OWNED``, ``SHARED_BORROWED``) and owner ids in invalid entries
  (``kvm_pgtable_stage2_set_owner``); the ``__pkvm_host_share_guest`` /
  ``__pkvm_host_unshare_guest`` page-state transitions and
  ``host_share_guest_count``. Here the host is Linux, its memory is GUP'd,
  and nothing checks who owns a page;
* the split between a host-side mirror (``pkvm_pgtable_stage2_map`` and the
  other ``KVM_PGT_FN()`` variants) and the EL2 tables reached by hypercalls:
  one stage 2, written directly;
* the hypervisor's own allocator: table pages come from ``zalloc_page``, not
  from a per-vCPU ``pkvm_memcache`` topped up by the host
  (``topup_hyp_memcache``, ``refill_memcache``) and reclaimed at teardown;
* ``guest_lock`` is a ``hyp_spinlock_t`` in pKVM; this design needs it to be
  a rwlock (the platform's ``mmu_lock``) with a read side for faults and
  ``mkyoung``; an EL2 rwlock with writer fairness is an assumption, not code
  pKVM has;
* v6.14's ``__pkvm_host_share_guest`` maps one page per call (no blocks);
  this candidate keeps kvm-classic's 2 MiB blocks, which later kernels give
  pKVM too (an ``nr_pages`` range).

It does not keep kvm-classic's known finding ``block-split-no-cmo``
(docs/findings.md): when the fault path breaks a block to install a table
(a write or exec fault in a logging slot), the old block is cleaned+invalidated
to PoC without FWB, as in ``kvm-classic-split-cmo``
(:class:`~candidates.classic.SplitCleaningPgTable`). The pages the split drops
would otherwise be left with stale lines that a host copy (migration) reads.
"""

from __future__ import annotations

from candidates.classic import ClassicCandidate, SplitCleaningPgTable
from candidates.pgtable import (
    EAGAIN, ERANGE, HANDLE_FAULT, LAST_LEVEL, SHARED, TABLE_PRE, Ctx, _WalkData)
from conformance.protocol import PAGE_SIZE, FaultKind, GuestAbort, Memslot
from model import descriptors as d
from model.geometry import granule

#: The level whose leaf maps each block size (2 MiB at L2, 1 GiB at L1).
_BLOCK_LEVEL = {granule(level): level for level in (1, 2)}


class PkvmPgTable(SplitCleaningPgTable):
    """``struct kvm_pgtable`` built for a hypervisor without RCU, walked by
    readers that never unlink a table (and cleaning a block it splits)."""

    def __init__(self, svc):
        super().__init__(svc)
        #: vCPU -> the stage-2 abort its fault path is handling, so that
        #: :meth:`map` can fall back to the faulting page when a table is in
        #: the way of a block (``user_mem_abort`` knows the IPA, the map call
        #: of kvm-classic's fault path gets only the block-aligned range).
        #: One entry per vCPU: each vCPU handles one abort at a time.
        self.faults: dict[int, GuestAbort] = {}

    # ============================================ no RCU (§2.2 step 2, §7.6)
    def walk(self, addr: int, size: int, cb, flags: int) -> int:
        """``kvm_pgtable_walk`` as built for EL2, minus its ``-EPERM`` for
        ``SHARED``: a shared walk here means "other readers of the rwlock may
        race with me" (``cmpxchg``), never ``rcu_read_lock``. Safe because no
        table is unlinked while the read lock is held."""
        start = addr & ~(PAGE_SIZE - 1)
        end = (addr + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if end > self.geom.ipa_limit or start >= end:
            return ERANGE if end > self.geom.ipa_limit else 0
        return self._walk_pgd(_WalkData(start, end, cb, flags))

    def free_unlinked_table(self, table: int, level: int) -> None:
        """Only a collapse unlinks a non-empty table under the read lock,
        and this walker never collapses; reaching here is a bug."""
        raise RuntimeError("kvm-pkvm: free_unlinked_table without RCU "
                           f"(table PA {table:#x}, level {level})")

    # ================================================ map without collapse
    def _map_walker(self, phys: int, prot: d.Prot, force_pte: bool):
        """kvm-classic's map walker, except ``TABLE_PRE``: where a block is
        allowed but a table is in the way, leave the table alone and return
        ``-EAGAIN`` (the fault path retries; :meth:`map` then sees the table
        and maps the faulting page in it)."""
        walker = super()._map_walker(phys, prot, force_pte)

        def cb(ctx: Ctx, visit: int) -> int:
            if visit == TABLE_PRE:
                target = phys + (ctx.addr - ctx.start)
                if self._leaf_allowed(ctx, target, ctx.end, force_pte):
                    return EAGAIN  # no table -> block under the read lock
                return 0
            return walker(ctx, visit)

        return cb

    def table_at(self, addr: int, level: int) -> bool:
        """Is the level-``level`` entry on the walk to ``addr`` a table?"""
        found = [False]

        def cb(ctx: Ctx, visit: int) -> int:
            if ctx.level == level:
                found[0] = True
            return 0

        self.walk(addr, PAGE_SIZE, cb, TABLE_PRE | SHARED)
        return found[0]

    def map(self, addr: int, size: int, phys: int, prot: d.Prot, flags: int = 0,
            force_pte: bool = False) -> int:
        """``kvm_pgtable_stage2_map``, served at 4 KiB when the fault path
        asks for a block and a table is in the way: map the faulting page
        into the table, or, for a permission fault, relax the leaf that
        faulted (``user_mem_abort`` step 18 with ``vma_pagesize`` 4 KiB)."""
        level = _BLOCK_LEVEL.get(size)
        fault = self.faults.get(self.svc.current_vcpu)
        if (level is None or not flags & HANDLE_FAULT or fault is None
                or not addr <= fault.ipa < addr + size or not self.table_at(addr, level)):
            return super().map(addr, size, phys, prot, flags, force_pte)
        if fault.kind is FaultKind.PERMISSION and fault.level == LAST_LEVEL:
            return self.relax_perms(fault.ipa, prot)
        return super().map(fault.ipa, PAGE_SIZE, phys + (fault.ipa - addr), prot, flags,
                           force_pte)


class PkvmCandidate(ClassicCandidate):
    version = "pkvm-rwlock-no-collapse/1"
    pgtable_cls = PkvmPgTable
    known_findings = frozenset()  # the map-time split cleans the old block

    # ================================================== the fault path (§3)
    def user_mem_abort(self, fault: GuestAbort, slot: Memslot):
        """kvm-classic's ``user_mem_abort``, with the abort made known to the
        page table for the no-collapse fallback (:meth:`PkvmPgTable.map`)."""
        pgt, vcpu = self.pgt, self.services.current_vcpu
        if pgt is None:
            return super().user_mem_abort(fault, slot)
        pgt.faults[vcpu] = fault
        try:
            return super().user_mem_abort(fault, slot)
        finally:
            del pgt.faults[vcpu]

    # ========================================= memslots and dirty logging (§4)
    def disable_logging(self, slot: Memslot) -> None:
        """Seed 001's alternative to lazy collapse: unmap the slot under the
        write lock (its 4 KiB leaves and the tables that become empty, freed
        at once); later faults map 2 MiB blocks again."""
        with self.services.mmu_write_lock():
            if self.pgt is not None:
                self.pgt.unmap(slot.base_gfn << 12, slot.npages << 12)

    # ============================================================ teardown
    def release(self) -> None:
        """``kvm_free_stage2_pgd`` as pKVM's ``reclaim_guest_pages`` does it:
        detach and destroy under the write lock (``guest_lock``), so that
        every table free happens with the write lock held."""
        with self.services.mmu_write_lock():
            pgt, self.pgt = self.pgt, None
            if pgt is not None:
                pgt.destroy()
