"""A small ``kvm_pgtable``-style stage-2 walker framework (rules §2).

This is deliberately close to ``arch/arm64/kvm/hyp/pgtable.c`` so that a
candidate built on it reads like KVM:

* :meth:`Stage2PgTable.walk` visits entries with ``TABLE_PRE`` / ``LEAF`` /
  ``TABLE_POST`` callbacks and **re-reads** the entry after a PRE or LEAF
  callback, which is how ``map`` descends into a table it has just installed
  (§2.2 step 5); ``-EAGAIN`` continues a walk unless ``HANDLE_FAULT`` (step 6).
* break-before-make with the LOCKED marker (§2.4): ``try_break_pte`` /
  ``make_pte``; CMOs happen while the entry is LOCKED.
* the operations of §2.5: map (with table→block collapse in ``TABLE_PRE``
  and block→table replacement in ``LEAF``), unmap (with pruning of empty
  tables), wrprotect, relax_perms, mkyoung, test_clear_young, flush, split,
  create_unlinked, free_unlinked and destroy.

Return codes are negative errno values as in the kernel (0 on success).
Everything touches the world only through the candidate's services.
"""

from __future__ import annotations

from model import descriptors as d
from model.geometry import MIN_BLOCK_LEVEL, PAGE_SIZE, granule, index

# kvm_pgtable_walk_flags (v6.5-v6.12 values, rules §2.1)
LEAF = 1 << 0
TABLE_PRE = 1 << 1
TABLE_POST = 1 << 2
SHARED = 1 << 3
HANDLE_FAULT = 1 << 4
SKIP_BBM_TLBI = 1 << 5
SKIP_CMO = 1 << 6

EAGAIN = -11
E2BIG = -7
ENOMEM = -12
EINVAL = -22
ERANGE = -34

LAST_LEVEL = 3
_GRANULE = tuple(granule(level) for level in range(4))


class Ctx:
    """``struct kvm_pgtable_visit_ctx``."""

    __slots__ = ("ptep", "old", "level", "addr", "start", "end", "flags")

    def __init__(self, ptep, old, level, addr, start, end, flags):
        self.ptep, self.old, self.level = ptep, old, level
        self.addr, self.start, self.end, self.flags = addr, start, end, flags

    @property
    def granule(self) -> int:
        return granule(self.level)

    @property
    def base(self) -> int:
        """IPA of the first byte the visited entry maps."""
        return self.addr & ~(granule(self.level) - 1)

    @property
    def shared(self) -> bool:
        return bool(self.flags & SHARED)


class _WalkData:
    """``struct kvm_pgtable_walk_data``: the cursor shared by every level."""

    __slots__ = ("start", "addr", "end", "cb", "flags")

    def __init__(self, start, end, cb, flags):
        self.start = self.addr = start
        self.end, self.cb, self.flags = end, cb, flags


def _continue(flags: int, ret: int) -> bool:
    """``kvm_pgtable_walk_continue`` (§2.2 step 6)."""
    if ret == EAGAIN:
        return not flags & HANDLE_FAULT
    return ret == 0


class Stage2PgTable:
    """``struct kvm_pgtable`` for a guest stage 2, plus its operations."""

    def __init__(self, svc):
        self.svc = svc
        self.geom = svc.geometry
        self.fwb = svc.config.fwb
        self.dic = svc.config.dic
        # KVM skips the map-time clean with FWB because "FWB implies IDC"
        # (kvm_mmu.h, __clean_dcache_guest_page); generated configs agree.
        self.clean_on_map = not self.fwb
        # stage2_unmap_defer_tlb_flush (v6.6, §2.5): with FEAT_TLBIRANGE and
        # FWB, unmap clears every leaf and issues one range TLBI at the end
        # (no CMO has to wait for a per-leaf TLBI). FEAT_S2FWB and
        # FEAT_TLBIRANGE both come with Armv8.4, so FWB hardware has both.
        self.defer_unmap_tlbi = self.tlbi_range and self.fwb
        self.pgd = svc.alloc_pgd()

    #: ``system_supports_tlb_range()``
    tlbi_range = True
    #: Clean+invalidate the old block when the map walker breaks it for a
    #: table (not KVM v6.12: the finding block-split-no-cmo, rules §6.6).
    clean_broken_block = False

    # ================================================================ walking
    def walk(self, addr: int, size: int, cb, flags: int) -> int:
        """``kvm_pgtable_walk``: visit ``[addr, addr + size)`` rounded out to pages."""
        start = addr & ~(PAGE_SIZE - 1)
        end = (addr + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if end > self.geom.ipa_limit or start >= end:
            return ERANGE if end > self.geom.ipa_limit else 0
        data = _WalkData(start, end, cb, flags)
        if flags & SHARED:
            with self.svc.rcu_read_lock():  # kvm_pgtable_walk_begin (§2.2 step 2)
                return self._walk_pgd(data)
        return self._walk_pgd(data)

    def _walk_pgd(self, data: _WalkData) -> int:
        page, _ = self.geom.pgd_slot(data.addr)
        ret = 0
        while data.addr < data.end and page < self.geom.pgd_pages:
            ret = self._walk_table(data, self.pgd + (page << 12), self.geom.start_level)
            if ret:
                break
            page += 1
        return ret

    def _walk_table(self, data: _WalkData, table: int, level: int) -> int:
        """``__kvm_pgtable_walk``: one table page from the cursor's index."""
        ret = 0
        for idx in range(index(data.addr, level), 512):
            if data.addr >= data.end:
                break
            ret = self._visit(data, table + idx * 8, level)
            if ret:
                break
        return ret

    def _visit(self, data: _WalkData, ptep: int, level: int) -> int:
        """``__kvm_pgtable_visit`` (§2.2 step 5)."""
        svc = self.svc
        ctx = Ctx(ptep, svc.read_pte(ptep), level, data.addr, data.start, data.end,
                  data.flags)
        table = d.is_table(ctx.old, level)
        ret, reload = 0, False
        if table and data.flags & TABLE_PRE:
            ret, reload = data.cb(ctx, TABLE_PRE), True
        if not table and data.flags & LEAF:
            ret, reload = data.cb(ctx, LEAF), True
        if reload:  # descend into what the callback just installed
            ctx.old = svc.read_pte(ptep)
            table = d.is_table(ctx.old, level)
        if ret and not _continue(data.flags, ret):
            return ret
        if not table:
            size = _GRANULE[level]
            data.addr = (data.addr & ~(size - 1)) + size
            return 0
        ret = self._walk_table(data, d.pte_pa(ctx.old), level + 1)
        if not _continue(data.flags, ret):
            return ret
        if data.flags & TABLE_POST:
            ret = data.cb(ctx, TABLE_POST)
        return 0 if _continue(data.flags, ret) else ret

    def _walk_detached(self, table: int, level: int, cb, flags: int) -> int:
        """Walk an unlinked table page (the IPA is irrelevant; §2.5
        create_unlinked / free_unlinked): entries of a level-``level`` table."""
        data = _WalkData(0, granule(level - 1), cb, flags)
        return self._walk_table(data, table, level)

    # ============================================ break-before-make (§2.4)
    def try_set_pte(self, ctx: Ctx, new: int) -> bool:
        if not ctx.shared:
            self.svc.write_pte(ctx.ptep, new)
            return True
        return self.svc.cmpxchg_pte(ctx.ptep, ctx.old, new) == ctx.old

    def try_break_pte(self, ctx: Ctx) -> bool:
        svc = self.svc
        if d.is_locked(ctx.old):
            return False
        if not self.try_set_pte(ctx, d.INVALID_PTE_LOCKED):
            return False
        if not ctx.flags & SKIP_BBM_TLBI:
            if d.is_table(ctx.old, ctx.level):
                svc.tlb_flush_vmid_range(ctx.base, ctx.granule)
            elif d.is_valid(ctx.old):
                svc.tlb_flush_vmid_ipa(ctx.addr, ctx.level)
        if d.is_counted(ctx.old):
            svc.put_page(ctx.ptep)
        return True

    def make_pte(self, ctx: Ctx, new: int) -> None:
        if d.is_counted(new):
            self.svc.get_page(ctx.ptep)
        self.svc.write_pte(ctx.ptep, new)  # smp_store_release

    # ================================================================ map
    def _leaf_allowed(self, ctx: Ctx, phys: int, size_end: int, force_pte: bool) -> bool:
        """``stage2_leaf_mapping_allowed`` / ``kvm_block_mapping_supported``."""
        level = ctx.level
        if force_pte and level < LAST_LEVEL:
            return False
        if level < MIN_BLOCK_LEVEL:
            return False
        size = granule(level)
        if size > size_end - ctx.addr or ctx.addr % size:
            return False
        return phys % size == 0

    def map(self, addr: int, size: int, phys: int, prot: d.Prot, flags: int = 0,
            force_pte: bool = False) -> int:
        """``kvm_pgtable_stage2_map`` (§2.5)."""
        phys &= ~(PAGE_SIZE - 1)
        cb = self._map_walker(phys, prot, force_pte)
        return self.walk(addr, size, cb, flags | TABLE_PRE | LEAF)

    def leaf_sw_bits(self, prot: d.Prot) -> int:
        """Software bits a new leaf with ``prot`` carries (none here)."""
        return 0

    def leave_alone(self, old: int, new: int) -> bool:
        """``!stage2_pte_needs_update(old, new)``: both valid and differing
        only in permissions, so the map path leaves ``old`` to the
        permission-fault path (rules §2.5 map step 3)."""
        return d.perm_only_change(old, new)

    def _map_walker(self, phys: int, prot: d.Prot, force_pte: bool):
        svc = self.svc

        def try_leaf(ctx: Ctx) -> int:
            target = phys + (ctx.addr - ctx.start)
            if not self._leaf_allowed(ctx, target, ctx.end, force_pte):
                return E2BIG
            new = d.make_leaf(target, ctx.level, prot, self.fwb) | self.leaf_sw_bits(prot)
            if self.leave_alone(ctx.old, new):
                return EAGAIN  # left to the permission-fault path (relax_perms)
            if not self.try_break_pte(ctx):
                return EAGAIN
            if not ctx.flags & SKIP_CMO:
                if self.clean_on_map and d.is_cacheable(new, self.fwb):
                    svc.dcache_clean_inval_poc(target, ctx.granule)
                if not new & d.XN and not self.dic:
                    svc.icache_inval_pou(target, ctx.granule)
            self.make_pte(ctx, new)
            return 0

        def cb(ctx: Ctx, visit: int) -> int:
            if visit == TABLE_PRE:
                # table -> block collapse (§2.5 TABLE_PRE, §7.3, §7.4)
                target = phys + (ctx.addr - ctx.start)
                if not self._leaf_allowed(ctx, target, ctx.end, force_pte):
                    return 0
                child = d.pte_pa(ctx.old)
                ret = try_leaf(ctx)
                if ret:
                    return ret
                self.free_unlinked_table(child, ctx.level)
                return 0
            ret = try_leaf(ctx)
            if ret != E2BIG:
                return ret
            # block (or empty entry) -> table (§2.5 LEAF, -E2BIG)
            if ctx.level == LAST_LEVEL:
                return EINVAL
            child = svc.zalloc_page()
            if not self.try_break_pte(ctx):
                svc.put_page(child)
                return EAGAIN
            if self.clean_broken_block and self.clean_on_map and \
                    d.is_valid(ctx.old) and d.is_cacheable(ctx.old, self.fwb):
                # The pages of the block other than the one being mapped leave
                # stage 2 here; clean them now, after the TLBI (rules §6.6).
                svc.dcache_clean_inval_poc(d.pte_pa(ctx.old), ctx.granule)
            self.make_pte(ctx, d.Table(child).encode())
            return 0

        return cb

    def free_unlinked_table(self, table: int, level: int) -> None:
        """``mm_ops->free_unlinked_table``: RCU-deferred teardown (§7.3)."""
        self.svc.call_rcu(lambda: self.free_unlinked(table, level))

    def free_unlinked(self, table: int, level: int) -> None:
        """``kvm_pgtable_stage2_free_unlinked``: put every counted entry and
        child table of the detached ``table`` (the entry at ``level`` pointed
        at it), then the table itself."""
        svc = self.svc

        def cb(ctx: Ctx, visit: int) -> int:
            if d.is_counted(ctx.old):
                svc.put_page(ctx.ptep)
                if d.is_table(ctx.old, ctx.level):
                    svc.put_page(d.pte_pa(ctx.old))
            return 0

        self._walk_detached(table, level + 1, cb, LEAF | TABLE_POST)
        svc.put_page(table)

    def create_unlinked(self, phys: int, level: int, prot: d.Prot,
                        force_pte: bool = True) -> int:
        """``kvm_pgtable_stage2_create_unlinked``: a detached subtree mapping
        the level-``level`` granule at ``phys`` (no TLBI, no CMO)."""
        table = self.svc.zalloc_page()
        cb = self._map_walker(phys, prot, force_pte)
        ret = self._walk_detached(table, level + 1, cb, LEAF | SKIP_BBM_TLBI | SKIP_CMO)
        if ret:
            self.free_unlinked(table, level)
            raise RuntimeError(f"create_unlinked failed: {ret}")
        return table

    def split(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_split`` (v6.4+ eager splitting, write lock):
        replace every block in range by a table mapping the same memory with
        the same permissions (AF set), via BBM of the block."""
        def cb(ctx: Ctx, visit: int) -> int:
            if not d.is_valid(ctx.old) or ctx.level == LAST_LEVEL:
                return 0
            prot = d.pte_prot(ctx.old, self.fwb)
            child = self.create_unlinked(d.pte_pa(ctx.old), ctx.level, prot)
            if not self.try_break_pte(ctx):
                self.free_unlinked(child, ctx.level)
                return EAGAIN
            self.make_pte(ctx, d.Table(child).encode())
            return 0

        return self.walk(addr, size, cb, LEAF)

    # ============================================================== unmap
    def unmap(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_unmap`` (§2.5): whole leaves, TLBI each (with
        its level) or one range TLBI after the walk when deferred,
        clean+invalidate after the TLBI, prune empty tables (a cleared table
        entry is flushed at once, TTL unknown)."""
        svc = self.svc
        defer = self.defer_unmap_tlbi

        def cb(ctx: Ctx, visit: int) -> int:
            old = ctx.old
            if not d.is_valid(old):
                if d.is_counted(old):
                    svc.write_pte(ctx.ptep, 0)
                    svc.put_page(ctx.ptep)
                return 0
            child = None
            if d.is_table(old, ctx.level):
                child = d.pte_pa(old)
                if svc.page_count(child) != 1:
                    return 0
            self.unmap_put_pte(ctx, child, defer)
            if child is None:
                self.unmap_clean(ctx)
            else:
                self.free_pruned_table(child)
            return 0

        ret = self.walk(addr, size, cb, LEAF | TABLE_POST)
        if defer:
            svc.tlb_flush_vmid_range(addr, size)
        return ret

    def unmap_put_pte(self, ctx: Ctx, child: int | None, defer: bool) -> None:
        """``stage2_unmap_put_pte``: clear the entry, TLBI it (a pruned table
        entry at once with TTL unknown, for the walk caches; a leaf with its
        level unless the TLBI is deferred to one range after the walk), drop
        the parent's reference."""
        svc = self.svc
        svc.write_pte(ctx.ptep, 0)
        if child is not None:
            svc.tlb_flush_vmid_ipa(ctx.addr, None)
        elif not defer:
            svc.tlb_flush_vmid_ipa(ctx.addr, ctx.level)
        svc.put_page(ctx.ptep)

    def unmap_clean(self, ctx: Ctx) -> None:
        """After the TLBI, clean+invalidate an unmapped cacheable leaf to PoC
        (not with FWB; rules §6.2, C3)."""
        if not self.fwb and d.is_cacheable(ctx.old, self.fwb):
            self.svc.dcache_clean_inval_poc(d.pte_pa(ctx.old), ctx.granule)

    def free_pruned_table(self, child: int) -> None:
        """Free an empty table the unmap pruned: at once, under the write
        lock (no walker can be inside)."""
        self.svc.put_page(child)

    # ===================================================== attribute walks
    def update_leaf_attrs(self, addr: int, size: int, set_: int, clr: int,
                          flags: int) -> tuple[int, int | None, int]:
        """``stage2_update_leaf_attrs``: returns ``(ret, level, old pte)`` of
        the last leaf visited (level None if none was valid)."""
        svc = self.svc
        found = [None, 0]

        def cb(ctx: Ctx, visit: int) -> int:
            if not d.is_valid(ctx.old):
                return EAGAIN
            found[0], found[1] = ctx.level, ctx.old
            new = (ctx.old & ~clr) | set_
            if new != ctx.old:
                if not new & d.XN and ctx.old & d.XN and not self.dic:
                    svc.icache_inval_pou(d.pte_pa(new), ctx.granule)
                if not self.try_set_pte(ctx, new):
                    return EAGAIN
            return 0

        ret = self.walk(addr, size, cb, flags | LEAF)
        return ret, found[0], found[1]

    def wrprotect(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_wrprotect``: clear S2AP_W; no TLBI."""
        ret, _, _ = self.update_leaf_attrs(addr, size, 0, d.S2AP_W, 0)
        return ret

    def relax_perms(self, addr: int, prot: d.Prot) -> int:
        """``kvm_pgtable_stage2_relax_perms``: add (never remove) R/W/X, then a
        local TLBI on this CPU, also when nothing changed or we lost a race."""
        set_, clr = self.relax_attrs(prot)
        ret, level, _ = self.update_leaf_attrs(addr, PAGE_SIZE, set_, clr,
                                               SHARED | HANDLE_FAULT)
        if ret in (0, EAGAIN):
            self.svc.tlb_flush_vmid_ipa_nsh(addr, level)
        return ret

    def relax_attrs(self, prot: d.Prot) -> tuple[int, int]:
        """The descriptor bits ``relax_perms`` sets and clears for ``prot``."""
        set_, clr = 0, 0
        if d.Prot.R in prot:
            set_ |= d.S2AP_R
        if d.Prot.W in prot:
            set_ |= d.S2AP_W
        if d.Prot.X in prot:
            clr |= d.XN
        return set_, clr

    def mkyoung(self, addr: int) -> int:
        """``kvm_pgtable_stage2_mkyoung``: set AF; no TLBI (AF=0 is never cached)."""
        ret, _, _ = self.update_leaf_attrs(addr, PAGE_SIZE, d.AF, 0,
                                           SHARED | HANDLE_FAULT)
        return ret

    def test_clear_young(self, addr: int, size: int, mkold: bool) -> bool:
        """``kvm_pgtable_stage2_test_clear_young``: no TLBI."""
        young = [False]

        def cb(ctx: Ctx, visit: int) -> int:
            if not d.is_valid(ctx.old) or not ctx.old & d.AF:
                return 0
            young[0] = True
            if mkold and not self.try_set_pte(ctx, ctx.old & ~d.AF):
                return EAGAIN
            return 0

        self.walk(addr, size, cb, LEAF)
        return young[0]

    def flush(self, addr: int, size: int) -> None:
        """``kvm_pgtable_stage2_flush``: clean+invalidate cacheable leaves (no-op with FWB)."""
        if self.fwb:
            return
        svc = self.svc

        def cb(ctx: Ctx, visit: int) -> int:
            if d.is_cacheable(ctx.old, self.fwb):
                svc.dcache_clean_inval_poc(d.pte_pa(ctx.old), ctx.granule)
            return 0

        self.walk(addr, size, cb, LEAF)

    def get_leaf(self, addr: int) -> tuple[int, int]:
        """``kvm_pgtable_get_leaf``: ``(pte, level)`` of the entry mapping ``addr``."""
        out = [0, self.geom.start_level]

        def cb(ctx: Ctx, visit: int) -> int:
            out[0], out[1] = ctx.old, ctx.level
            return 0

        self.walk(addr, PAGE_SIZE, cb, LEAF)
        return out[0], out[1]

    # ============================================================ teardown
    def destroy(self) -> None:
        """``kvm_pgtable_stage2_destroy``: put every counted entry and table,
        then free the PGD; no TLBI (the VMID is dead). Entries are cleared
        before their table is released so that nothing freed stays linked."""
        svc = self.svc

        def cb(ctx: Ctx, visit: int) -> int:
            if not d.is_counted(ctx.old):
                return 0
            svc.write_pte(ctx.ptep, 0)
            svc.put_page(ctx.ptep)
            if d.is_table(ctx.old, ctx.level):
                svc.put_page(d.pte_pa(ctx.old))
            return 0

        self.walk(0, self.geom.ipa_limit, cb, LEAF | TABLE_POST)
        svc.free_pgd(self.pgd)
        self.pgd = None
