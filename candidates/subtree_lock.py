"""``kvm-parallel-subtree-lock``: kvm-parallel whose table→block collapse
takes ownership of the unlinked subtree the way the 2022 RFC did (seed 001).

What it does, in the rules' terms (everything else is
:class:`~candidates.kvm_parallel.KvmParallelCandidate`, and through it
:class:`~candidates.classic.ClassicCandidate`):

* **Collapse with a locked subtree** (rules §2.5 ``TABLE_PRE``, §7.3, §7.4).
  When a fault's map walker finds a table where a block is allowed (the
  first fault in a 2 MiB window after dirty logging was turned off, rules
  §4.6) it runs v1 of Oliver Upton's "KVM: arm64: Parallelize stage 2 fault
  handling" (April 2022, the patch that adds ``stage2_unlink_pte``), not
  the merged v6.2 code:

  1. ``stage2_map_walk_table_pre``: break the table entry, the *anchor*
     (``cmpxchg`` to ``KVM_INVALID_PTE_LOCKED``, a range TLBI of the whole
     span the table covered, the entry's reference on its table dropped;
     rules §2.4). A walker that has not read the anchor yet now meets
     LOCKED, backs off and re-faults.
  2. ``stage2_unlink_pte`` on every descendant entry, depth first, inline in
     the faulting vCPU's walker, under the read side of ``mmu_lock``: take
     the entry with ``xchg(ptep, KVM_INVALID_PTE_LOCKED)``
     (``services.xchg_pte``); while the value it got back is itself LOCKED
     (``stage2_unlink_pte_shared``: another walker is inside its own
     break-before-make there) ``cpu_relax()`` and ``xchg`` again, until the
     other walker has published and the ``xchg`` returns what it stored;
     recurse into a table entry; drop the reference of every counted entry
     (``put_page(ptep)``). Empty entries are taken too: an entry this walk
     has passed stays LOCKED, so a walker that read the anchor before step 1
     and is still inside the subtree can no longer install anything there
     (its ``cmpxchg`` from the value it read fails, and a LOCKED entry makes
     it return ``-EAGAIN``). Whatever it installed *before* the ``xchg``
     reached the entry is what the ``xchg`` returns, so its reference is
     dropped here and nothing leaks.
  3. The anchor's ``TABLE_POST`` in the RFC: clean+invalidate the block
     (without FWB) and publish it (``stage2_make_pte``) on the entry that
     has been LOCKED since step 1.
  4. The table *pages* of the subtree (their own first reference, all that
     is left on them after step 2) are put from one ``call_rcu`` callback,
     after a grace period.

  The merged design (kvm-classic, kvm-parallel) instead publishes the block
  first and hands the untouched subtree to ``free_unlinked_table``
  (``stage2_free_unlinked_table`` → ``call_rcu`` →
  ``kvm_pgtable_stage2_free_unlinked``), which walks and frees it once every
  walker that could have been inside has left: no atomics, no spinning, but
  the teardown waits for the grace period.

**Why the pages still wait for RCU.** The issue that asked for this
candidate suggested freeing the subtree at once, since the collapsing walker
now owns every entry. It does not own the *memory*: a walker that read the
anchor (or an entry below it) a moment before step 1 may still be about to
read an entry of a table page, and the ``xchg`` loop cannot know when that
walker has left. In the RFC the locking is about ownership of the entries,
and the memory is still RCU's: Quentin Perret in the review, "as long as the
sub-tree isn't freed under their feet (which should be the point of the RCU
protection)", and Oliver Upton, "All bets are off until the next RCU grace
period". So step 4 keeps ``call_rcu``. The suite would catch the early free:
its ``table-lifecycle`` monitor fails a table page freed while another task
is still inside the RCU read-side section it was in when the table was
unlinked (docs/parallel.md), and ``tests/test_subtree_lock.py`` shows a
variant that frees the pages at once failing exactly that way (rules §7.3,
§9.7 L2).

**Why kvm-parallel as the parent.** Its fast paths relax and age leaves
under ``rcu_read_lock()`` alone, without ``mmu_lock``: one more kind of
walker that can be inside a subtree being collapsed, and one that the
read-lock argument cannot order. The ``xchg`` wins against every
``cmpxchg``, whoever holds what, so the design has to hold for those walkers
too, and the parallel machine checks that. It also makes the cost
comparison direct: ``kvm-parallel`` and this candidate differ in the
collapse path alone.

**What it costs** (docs/subtree-lock.md): one ``xchg`` per entry of every
collapsed table, 512 for a 2 MiB collapse, all inside the faulting vCPU's
fault while the anchor is LOCKED (other vCPUs touching that 2 MiB re-fault
meanwhile), plus a spin whenever the ``xchg`` meets another walker's LOCKED
entry; in exchange the RCU callback only drops page references and walks
nothing.
"""

from __future__ import annotations

from candidates.kvm_parallel import (
    KvmParallelCandidate, ParallelStage2PgTable)
from candidates.pgtable import EAGAIN, SKIP_CMO, TABLE_PRE, Ctx
from model import descriptors as d

#: Entries of one table page.
PTRS_PER_TABLE = 512


class SubtreeLockStage2PgTable(ParallelStage2PgTable):
    """:class:`~candidates.kvm_parallel.ParallelStage2PgTable` whose map
    walker collapses a table into a block with the RFC's
    ``stage2_unlink_pte`` (module docstring). Only ``TABLE_PRE`` of the map
    walker changes; every other visit is kvm-parallel's."""

    def _map_walker(self, phys: int, prot: d.Prot, force_pte: bool):
        walker = super()._map_walker(phys, prot, force_pte)
        sw = self.leaf_sw_bits(prot)

        def cb(ctx: Ctx, visit: int) -> int:
            if visit != TABLE_PRE:
                return walker(ctx, visit)
            target = phys + (ctx.addr - ctx.start)
            if not self._leaf_allowed(ctx, target, ctx.end, force_pte):
                return 0  # descend: the block does not fit here
            new = d.make_leaf(target, ctx.level, prot, self.fwb) | sw
            return self.collapse(ctx, new)

        return cb

    def collapse(self, ctx: Ctx, new: int) -> int:
        """Replace the table entry ``ctx`` (the anchor) by the block ``new``:
        ``stage2_map_walk_table_pre`` (break), ``stage2_unlink_pte`` on the
        whole subtree, the anchor's ``TABLE_POST`` (CMO, make), and the table
        pages put after a grace period. ``-EAGAIN`` if another walker changed
        the anchor first."""
        svc = self.svc
        child = d.pte_pa(ctx.old)
        # LOCKED, TLBI of the table's whole span (rules §2.4), the anchor's
        # reference on its own table dropped.
        if not self.try_break_pte(ctx):
            return EAGAIN
        pages = self.unlink_subtree(child, ctx.level + 1, ctx.shared)
        if not ctx.flags & SKIP_CMO:  # while the anchor is LOCKED (rules §6.2)
            if self.clean_on_map and d.is_cacheable(new, self.fwb):
                svc.dcache_clean_inval_poc(d.pte_pa(new), ctx.granule)
            if not new & d.XN and not self.dic:
                svc.icache_inval_pou(d.pte_pa(new), ctx.granule)
        self.make_pte(ctx, new)
        self.free_unlinked_pages(pages)
        return 0

    def unlink_subtree(self, table: int, level: int, shared: bool) -> list[int]:
        """``stage2_unlink_pte`` on every entry of the detached level-``level``
        table page ``table`` and, depth first, of every table below it: each
        entry is taken (left LOCKED), a table entry is recursed into, a
        counted entry's reference on its table page is dropped. Returns the
        table pages, children before parents, each now holding only its own
        first reference."""
        svc = self.svc
        pages: list[int] = []
        for idx in range(PTRS_PER_TABLE):
            ptep = table + idx * 8
            old = self.unlink_pte(ptep, shared)
            if d.is_table(old, level):
                pages += self.unlink_subtree(d.pte_pa(old), level + 1, shared)
            if d.is_counted(old):
                svc.put_page(ptep)
        pages.append(table)
        return pages

    def unlink_pte(self, ptep: int, shared: bool) -> int:
        """Take the entry: ``stage2_unlink_pte_shared`` (``xchg`` to LOCKED,
        spinning while another walker holds it LOCKED) for a shared walker;
        a read and a plain store for an exclusive one. Returns the value
        taken, never LOCKED."""
        svc = self.svc
        if not shared:
            old = svc.read_pte(ptep)
            svc.write_pte(ptep, d.INVALID_PTE_LOCKED)
            return old
        while True:
            old = svc.xchg_pte(ptep, d.INVALID_PTE_LOCKED)
            if old != d.INVALID_PTE_LOCKED:
                return old
            svc.cpu_relax()  # another walker is inside its break-before-make here

    def free_unlinked_pages(self, pages: list[int]) -> None:
        """Drop the last reference of each page of the unlinked subtree after
        an RCU grace period: walkers that read the anchor before the break
        may still be reading these pages (module docstring)."""
        svc = self.svc

        def free() -> None:
            for page in pages:
                svc.put_page(page)

        svc.call_rcu(free)


class SubtreeLockCandidate(KvmParallelCandidate):
    """``kvm-parallel-subtree-lock``: see the module docstring."""

    version = "kvm-arm64-rfc2022-subtree-lock/1"
    pgtable_cls = SubtreeLockStage2PgTable
