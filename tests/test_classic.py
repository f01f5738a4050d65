"""``kvm-classic`` and ``eager-unmap``: conformance runs and targeted scenarios
on a bare :class:`~conformance.platform.Platform` (rules §2-§6)."""

from __future__ import annotations

import pytest

from candidates.classic import ClassicCandidate
from candidates.classic import ClassicEagerSplitCandidate as EagerSplitCandidate
from candidates.eager_unmap import EagerUnmapCandidate
from conformance.platform.core import Platform
from conformance.protocol import GuestAbort, Memslot, MemslotChange, VmConfig
from conformance.runner import run
from model.memory import PageUse

MIB2 = 2 << 20
HVA = 0x4000_0000
BASE_GFN = 0x40000
IPA = BASE_GFN << 12


# ------------------------------------------------------------------ helpers
def boot(cls=ClassicCandidate, *, thp=True, misaligned=False, npages=1024, **config):
    """A platform as the machine boots it: one VMA, one memslot at gfn 0x40000
    whose hva is congruent modulo 2 MiB unless ``misaligned``."""
    config = {"nr_vcpus": 2, "hw_af": True, **config}
    p = Platform(VmConfig(**config))
    p.host_mmap(HVA, HVA + (npages << 12) + MIB2, thp)
    p.step = "boot"
    p.candidate = p.construct(cls)
    for vcpu in range(p.config.nr_vcpus):
        p.call("vcpu_init", vcpu, vcpu=vcpu)
    slot = Memslot(0, BASE_GFN, npages, HVA + (0x1000 if misaligned else 0))
    p.set_memslot(None, slot, MemslotChange.CREATE)
    return p, slot


def leaves(p, slot):
    """``{ipa: (level, writable)}`` of every valid leaf in the slot."""
    return {step.ipa: (leaf.level, leaf.write)
            for step, leaf in p.leaves(slot.base_gfn << 12, slot.end_gfn << 12)}


def l3_table_of(p, ipa):
    for step, leaf in p.leaves(ipa, ipa + 0x1000):
        if leaf.level == 3:
            return step.table_pfn
    return None


def set_logging(p, slot, on):
    new = Memslot(slot.id, slot.base_gfn, slot.npages, slot.userspace_addr,
                  slot.readonly, on)
    p.set_memslot(slot, new, MemslotChange.FLAGS_ONLY)
    return new


def teardown(p):
    p.destroy()  # release + destroy + leak checks (monitors.after_destroy)


# ------------------------------------------------------------ conformance
@pytest.mark.parametrize("name, cls", [("kvm-classic", ClassicCandidate),
                                       ("eager-unmap", EagerUnmapCandidate)])
def test_candidate_passes_ci(name, cls):
    result = run(name, cls, profile="ci", max_examples=200)
    assert result.status == "pass", f"{result.failure}\n" + "\n".join(result.trace)


# ---------------------------------------------------------- block mappings
@pytest.mark.parametrize("fwb", [False, True])
def test_thp_backed_congruent_slot_gets_a_2mib_block(fwb):
    p, slot = boot(fwb=fwb, idc=True)
    assert p.guest_access(0, IPA + 0x3000, "write", 5).value == 5
    assert leaves(p, slot) == {IPA: (2, True)}
    assert p.guest_access(1, IPA + 0x1FF000, "read").exit is None  # same block
    assert p.counters["faults: translation"] == 1
    # KVM cleans the whole granule to PoC at map time, except with FWB (§6.2).
    assert p.counters["bytes cleaned+invalidated"] == (0 if fwb else MIB2)
    teardown(p)


def test_misaligned_slot_gets_4k_pages():
    p, slot = boot(misaligned=True)
    p.guest_access(0, IPA + 0x3000, "read")
    p.guest_access(0, IPA + 0x4000, "write", 1)
    assert leaves(p, slot) == {IPA + 0x3000: (3, True), IPA + 0x4000: (3, True)}
    teardown(p)


def test_non_thp_backing_gets_4k_pages():
    p, slot = boot(thp=False)
    p.guest_access(0, IPA, "read")
    assert leaves(p, slot) == {IPA: (3, True)}
    teardown(p)


# ------------------------------------------------------------ dirty logging
def test_logging_write_splits_the_block_and_marks_dirty():
    p, slot = boot()
    p.guest_access(0, IPA, "read")
    assert leaves(p, slot) == {IPA: (2, True)}
    slot = set_logging(p, slot, True)
    assert leaves(p, slot) == {IPA: (2, False)}  # write-protected, still a block
    assert p.counters["tlbi: range"] == 1
    p.guest_access(0, IPA + 0x5000, "write", 9)
    # Block replaced by a table holding only the written page (§4.3); the
    # rest of the block faults back lazily, read-only.
    assert leaves(p, slot) == {IPA + 0x5000: (3, True)}
    assert p.dirty[slot.id] == {BASE_GFN + 5}
    p.guest_access(1, IPA + 0x6000, "read")
    assert leaves(p, slot)[IPA + 0x6000] == (3, False)
    assert p.get_dirty_log(slot) == frozenset({BASE_GFN + 5})
    assert leaves(p, slot)[IPA + 0x5000] == (3, False)  # re-protected by the harvest
    teardown(p)


def test_disabling_logging_collapses_back_to_a_block_and_frees_the_table():
    p, slot = boot()
    p.guest_access(0, IPA, "read")
    slot = set_logging(p, slot, True)
    p.guest_access(0, IPA + 0x5000, "write", 9)
    table = l3_table_of(p, IPA + 0x5000)
    assert table is not None
    slot = set_logging(p, slot, False)
    assert leaves(p, slot) == {IPA + 0x5000: (3, True)}  # nothing happens at once (§4.6)
    ranges = p.counters["tlbi: range"]
    p.guest_access(0, IPA + 0x7000, "read")  # translation fault → map(2 MiB) collapses
    p.grace_period()
    assert leaves(p, slot) == {IPA: (2, True)}
    assert p.counters["tlbi: range"] == ranges + 1  # BBM of the table entry
    assert p.mem.page_use(table) is PageUse.FREED
    assert p.counters["table pages allocated"] == p.counters["table pages freed"] + \
        sum(1 for u in p.mem.use.values() if u in (PageUse.TABLE, PageUse.PGD))
    teardown(p)


def test_collapsed_table_is_freed_only_after_a_grace_period():
    p, slot = boot()
    p.guest_access(0, IPA, "read")
    slot = set_logging(p, slot, True)
    p.guest_access(0, IPA + 0x5000, "write", 9)
    table = l3_table_of(p, IPA + 0x5000)
    slot = set_logging(p, slot, False)
    fault = p.translate(0, IPA + 0x7000, False, False)
    assert isinstance(fault, GuestAbort)
    p.current_vcpu = 0  # call the fault handler directly: no grace period after it
    try:
        p.candidate.handle_guest_abort(0, fault)
    finally:
        p.current_vcpu = None
    assert leaves(p, slot) == {IPA: (2, True)}
    assert table not in p.reachable
    assert p.mem.page_use(table) is PageUse.TABLE  # unlinked, awaiting RCU
    p.grace_period()
    assert p.mem.page_use(table) is PageUse.FREED
    teardown(p)


def test_logging_write_permission_fault_on_4k_page_relaxes_locally():
    p, slot = boot()
    slot = set_logging(p, slot, True)
    p.guest_access(0, IPA + 0x2000, "read")
    assert leaves(p, slot) == {IPA + 0x2000: (3, False)}
    local, broadcast = p.counters["tlbi: ipa local"], p.counters["tlbi: ipa broadcast"]
    p.guest_access(0, IPA + 0x2000, "write", 3)
    assert p.counters["faults: permission"] == 1
    assert p.counters["tlbi: ipa local"] == local + 1
    assert p.counters["tlbi: ipa broadcast"] == broadcast  # no break-before-make
    assert leaves(p, slot) == {IPA + 0x2000: (3, True)}
    assert p.dirty[slot.id] == {BASE_GFN + 2}
    teardown(p)


def test_stale_read_only_entry_on_another_vcpu_is_fixed_by_a_local_tlbi():
    """The other vCPU's cached RO entry makes it fault although the PTE is
    already writable: relax changes nothing but still TLBIs locally (§7.5)."""
    p, slot = boot()
    slot = set_logging(p, slot, True)
    p.guest_access(0, IPA, "read")
    p.guest_access(1, IPA, "read")
    p.guest_access(0, IPA, "write", 1)
    local = p.counters["tlbi: ipa local"]
    assert p.guest_access(1, IPA, "write", 2).value == 2
    assert p.counters["tlbi: ipa local"] == local + 1
    teardown(p)


def test_eager_split_splits_blocks_read_only_when_logging_is_enabled():
    p, slot = boot(EagerSplitCandidate)
    p.guest_access(0, IPA, "write", 1)
    slot = set_logging(p, slot, True)
    got = leaves(p, slot)
    assert len(got) == 512 and set(got.values()) == {(3, False)}
    p.guest_access(0, IPA + 0x1000, "write", 2)  # a pure relaxation now
    assert p.counters["tlbi: ipa local"] == 1
    teardown(p)


def test_logging_disable_in_eager_unmap_zaps_the_slot():
    p, slot = boot(EagerUnmapCandidate)
    slot = set_logging(p, slot, True)
    p.guest_access(0, IPA, "write", 1)
    slot = set_logging(p, slot, False)
    assert leaves(p, slot) == {}
    p.guest_access(0, IPA, "read")
    assert leaves(p, slot) == {IPA: (2, True)}
    teardown(p)


# ---------------------------------------------------------------- notifiers
@pytest.mark.parametrize("cls, kept", [(ClassicCandidate, True),
                                       (EagerUnmapCandidate, False)])
def test_protection_upgrade(cls, kept):
    p, slot = boot(cls, thp=False)
    p.host_op("mprotect_ro", HVA, HVA + 0x1000)
    p.guest_access(0, IPA, "read")
    assert leaves(p, slot) == {IPA: (3, False)}
    p.host_op("mprotect_rw", HVA, HVA + 0x1000)
    assert leaves(p, slot) == ({IPA: (3, False)} if kept else {})
    assert p.guest_access(0, IPA, "write", 4).value == 4
    assert leaves(p, slot) == {IPA: (3, True)}
    # classic fixes it with a relaxation; eager-unmap has to refault it in
    assert p.counters["faults: permission"] == (1 if kept else 0)
    teardown(p)


def test_unmap_prunes_empty_tables_and_release_frees_everything():
    p, slot = boot(thp=False)
    p.guest_access(0, IPA, "write", 1)
    tables = sum(1 for u in p.mem.use.values() if u is PageUse.TABLE)
    assert tables == 2  # L2 and L3 below the 40-bit VM's L1 PGD
    p.host_op("munmap", HVA, HVA + 0x1000)
    assert leaves(p, slot) == {}
    assert sum(1 for u in p.mem.use.values() if u is PageUse.TABLE) == 0
    p.exit_mmap()
    assert p.candidate.pgt is None
    teardown(p)  # destroy after release must tolerate the detached page table


def test_access_flag_fault_sets_af_without_tlbi():
    p, slot = boot(hw_af=False, thp=False)
    p.guest_access(0, IPA, "read")
    assert p.aging("clear_young", HVA, HVA + 0x1000) is True
    before = dict(p.counters)
    p.guest_access(0, IPA + 0x10, "read")  # TLB still holds it (no TLBI on clear_young)
    p.tlbs[0].invalidate_all()
    p.guest_access(0, IPA, "read")
    assert p.counters["faults: access_flag"] == before.get("faults: access_flag", 0) + 1
    assert p.counters["tlbi: ipa broadcast"] == before.get("tlbi: ipa broadcast", 0)
    assert p.aging("test_young", HVA, HVA + 0x1000) is True
    teardown(p)


def test_exec_fault_adds_x_after_icache_invalidation():
    p, slot = boot(thp=False)
    p.guest_access(0, IPA, "read")
    icache = p.counters["icache invalidations"]
    p.guest_access(0, IPA, "exec")
    assert p.counters["faults: permission"] == 1
    assert p.counters["icache invalidations"] == icache + 1
    assert next(leaf.exec for _, leaf in p.leaves(IPA, IPA + 0x1000))
    teardown(p)


# ------------------------------------------------------- known harness issues
def test_partial_upgrade_inside_a_thp_block():
    p, slot = boot()
    p.host_op("mprotect_ro", HVA, HVA + MIB2)
    p.guest_access(0, IPA, "read")
    assert leaves(p, slot) == {IPA: (2, False)}
    p.host_op("mprotect_rw", HVA + 0x5000, HVA + 0x6000)
    p.guest_access(0, IPA + 0x5000, "write", 7)
    assert leaves(p, slot) == {IPA + 0x5000: (3, True)}
