"""Tests for model.oracle: R4 (TVM, set/way, toggles) and FWB."""

from oracle_helpers import (
    GFN, ON, PAGE, caches_on, hva, observe_read, oracle, read,
    stale_after_nc_write, write)


def test_tvm_armed_at_init_and_caches_on_toggle_flushes():
    o = oracle()
    assert o.tvm_armed == [True, True]
    write(o, GFN, 5)  # caches off: NC write to PoC
    o.sctlr[0] = 0
    caches_on(o)  # armed: kvm_toggle_cache flushes, then TVM clears
    assert o.tvm_armed[0] is False and o.tvm_armed[1] is True
    assert read(o, GFN) == {5}


def test_toggle_after_tvm_cleared_does_not_flush():
    o = oracle()
    caches_on(o)  # armed -> flush, disarm
    assert not o.tvm_armed[0]
    observe_read(o, GFN, 0)  # clean line of 0 allocated
    o.write_sctlr(0, 0)  # not trapped: no flush
    assert not o.tvm_armed[0]
    write(o, GFN, 5)  # NC
    caches_on(o)  # not trapped: no flush; the stale line may still hit
    assert read(o, GFN) == {0, 5}


def test_caches_off_toggle_while_armed_flushes_and_stays_armed():
    o = oracle()
    o.sctlr[0] = ON  # caches on without the (flushing) trap; TVM still armed
    write(o, GFN, 5)  # cacheable: a dirty line of 5 over PoC 0
    assert o.tvm_armed[0]
    o.write_sctlr(0, 0)  # turning caches off while armed cleans dirty lines
    assert o.tvm_armed[0]
    assert read(o, GFN) == {5}


def test_caches_off_without_tvm_leaves_dirty_line():
    o = oracle()
    o.sctlr[0] = ON
    o.tvm_armed[0] = False
    write(o, GFN, 5)
    o.write_sctlr(0, 0)
    assert read(o, GFN) == {0, 5}


def test_set_way_rearms_and_flushes_once():
    o = oracle()
    stale_after_nc_write(o)
    assert not o.tvm_armed[0]
    o.set_way(0)  # first S/W op with TVM clear: flush and re-arm
    assert o.tvm_armed[0]
    caches_on(o)  # armed: flush again
    assert read(o, GFN) == {5}


def test_set_way_while_armed_does_nothing():
    o = oracle()
    # vCPU1 builds a stale line below an NC write, with its TVM cleared
    caches_on(o, 1)
    observe_read(o, GFN, 0, vcpu=1)
    o.write_sctlr(1, 0)
    write(o, GFN, 5, vcpu=1)
    o.set_way(0)  # vCPU0 is still armed: no flush (the toggle will do it)
    assert o.tvm_armed == [True, False]
    caches_on(o, 1)  # not trapped for vCPU1
    assert read(o, GFN, vcpu=1) == {0, 5}
    o.set_way(1)  # vCPU1's first S/W op with TVM clear: flush and re-arm
    assert o.tvm_armed == [True, True]
    assert read(o, GFN, vcpu=1) == {5}


def test_stale_line_visible_without_maintenance():
    o = oracle()
    stale_after_nc_write(o)
    caches_on(o)  # TVM already cleared: no flush
    assert read(o, GFN) == {0, 5}


def test_set_way_flush_cleans_stale_line():
    o = oracle()
    stale_after_nc_write(o)
    o.set_way(0)
    o.sctlr[0] = ON  # pretend the toggle is not trapped: only set/way flushed
    assert read(o, GFN) == {5}


def test_toggle_flush_skips_pages_a_later_fault_in_the_window_may_have_dropped():
    # The guest writes GFN+1 with caches off (PoC 5; a stale clean line of 0
    # may remain), then faults on GFN in the same 2 MiB window: KVM may replace
    # a block by a table there and drop GFN+1 without any CMO (§2.5, §6.2),
    # so the caches-on flush need not reach it. The VMM may read the stale 0.
    o = oracle()
    write(o, GFN + 1, 5)
    observe_read(o, GFN, 0)
    caches_on(o)
    assert o.vmm_read(hva(GFN + 1)) == {0, 5}
    assert read(o, GFN) == {0}  # GFN is certainly mapped: flushed


def test_toggle_flush_covers_the_page_last_accessed_in_each_window():
    o = oracle()
    write(o, GFN + 1, 5)  # NC write; stale clean line of 0 possible
    write(o, GFN + 512, 7)  # the other window: GFN + 1 stays certainly mapped
    caches_on(o)
    assert o.vmm_read(hva(GFN + 1)) == {5}
    assert o.vmm_read(hva(GFN + 512)) == {7}


def test_mprotect_rw_invalidates_nothing():
    # R6: permission upgrades are invisible
    o = oracle()
    observe_read(o, GFN, 0)
    o.host_op("mprotect_rw", hva(GFN), hva(GFN) + PAGE)
    assert GFN in o.exposed
    o.host_op("mprotect_ro", hva(GFN), hva(GFN) + PAGE)
    assert GFN not in o.exposed


# ----------------------------------------------------------------- FWB
def test_fwb_is_coherent_everywhere():
    o = oracle(fwb=True)
    assert o.tvm_armed == [False, False]
    assert o.guest_cacheable(0)
    observe_read(o, GFN, 0)
    o.vmm_write(hva(GFN), 5)
    assert read(o, GFN) == {5}
    write(o, GFN, 6)
    assert o.vmm_read(hva(GFN)) == {6}
    o.set_way(0)
    o.write_sctlr(0, ON)
    assert o.tvm_armed == [False, False]
    assert read(o, GFN) == {6}
