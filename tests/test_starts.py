"""Warm starts (``Layout.start``, ``Layout.caches_on``): ``boot`` plays the VM's
earlier life through the candidate, and each start leaves the state its
docstring promises (strategies/layouts.py). A start that drifted (no blocks
after ``running``, blocks left after ``migrating``, caches still off after
``caches_on``) would silently starve the bugs it exists for."""

from __future__ import annotations

import attrs
import pytest

from candidates.classic import ClassicCandidate
from candidates.mutants import MUTANTS
from conformance.failures import files
from conformance.errors import PropertyViolation
from conformance.machines.sequential import machine_for
from conformance.protocol import SCTLR_C, SCTLR_M, Memslot, VmConfig
from strategies.layouts import Layout, Vma

MIB2 = 2 << 20
HVA = 0x4000_0000
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=False, dic=False, idc=False, nr_vcpus=2)


def _layout(start, *, caches_on=False, logging=False):
    # One THP-backed, congruent 4 MiB slot: two windows where blocks are allowed.
    slot = Memslot(0, 0x40000, 1024, HVA, log_dirty_pages=logging)
    return Layout((slot,), (Vma(HVA, HVA + (1024 << 12) + MIB2, True),), start, caches_on)


def _boot(layout, cls=ClassicCandidate, config=CONFIG):
    machine = machine_for("starts", cls)()
    with files.not_writing():
        machine.boot(config=config, layout=layout)
    return machine


def _leaf_sizes(machine):
    return {size for _ipa, _pa, size in machine.platform.monitors.mapped_cacheable()}


def test_cold_start_maps_nothing():
    assert _leaf_sizes(_boot(_layout("cold"))) == set()


def test_running_start_leaves_blocks():
    machine = _boot(_layout("running"))
    assert _leaf_sizes(machine) == {MIB2}
    assert not machine.platform.memslots[0].log_dirty_pages


def test_running_start_then_logging_as_the_layout_says():
    machine = _boot(_layout("running", logging=True))
    assert machine.platform.memslots[0].log_dirty_pages
    assert _leaf_sizes(machine) == {MIB2}  # write-protected, split on the first write


def test_migrating_start_splits_blocks_while_logging():
    machine = _boot(_layout("migrating", logging=True))
    assert machine.platform.memslots[0].log_dirty_pages
    assert _leaf_sizes(machine) == {1 << 12}


def test_migrated_start_leaves_4k_tables_with_logging_off():
    machine = _boot(_layout("migrated"))
    assert not machine.platform.memslots[0].log_dirty_pages
    assert _leaf_sizes(machine) == {1 << 12}


@pytest.mark.parametrize("start", ["running", "migrating", "migrated"])
def test_caches_on_start_turns_every_vcpu_on_and_stops_trapping(start):
    machine = _boot(_layout(start, caches_on=True, logging=start == "migrating"))
    on = SCTLR_M | SCTLR_C
    assert machine.platform.sctlr == [on, on]
    assert machine.oracle.sctlr == [on, on]
    assert machine.platform.tvm == [False, False]  # kvm_toggle_cache cleared TVM
    assert machine.oracle.tvm_armed == [False, False]
    assert "every vCPU turned its MMU and caches on" in machine.layout.describe()


def test_caches_off_start_keeps_tvm_armed():
    machine = _boot(_layout("running"))
    assert machine.platform.sctlr == [0, 0]
    assert machine.platform.tvm == [True, True]
    assert "caches on" not in machine.layout.describe()


def test_caches_on_start_is_checked_like_a_step():
    # Turning caches on over mapped blocks must flush them: the mutant fails in boot.
    with pytest.raises(PropertyViolation) as info:
        _boot(_layout("running", caches_on=True), MUTANTS["mutant-toggle-no-flush-on-enable"])
    assert info.value.property == "cache-maintenance"
    assert "turned its MMU/caches on" in info.value.message
    # The step label names the part of boot that failed.
    assert info.value.step == ("1: boot (the VM and layout above): "
                               "every vCPU turning its MMU and caches on")


def test_a_guest_observation_in_a_warm_start_names_the_boot_phase():
    with pytest.raises(PropertyViolation) as info:
        _boot(_layout("running"), MUTANTS["mutant-map-no-dcache-clean"])
    assert info.value.property == "guest-observation"
    assert info.value.step == ("1: boot (the VM and layout above): "
                               "vCPU0 reading 8 pages of every 2 MiB window of slot 0")


@pytest.mark.parametrize("caches_on", [False, True])
def test_one_set_way_op_catches_set_way_ignored_only_with_caches_on(caches_on):
    # With caches off TVM is still armed, so KVM has nothing to do on set/way
    # yet; once the guest runs with caches on, the first set/way op must flush.
    cls = MUTANTS["mutant-set-way-ignored"]
    machine = _boot(_layout("running", caches_on=caches_on), cls)
    with files.not_writing():
        if caches_on:
            with pytest.raises(PropertyViolation, match="first set/way operation"):
                machine.guest_set_way(vcpu=0)
        else:
            machine.guest_set_way(vcpu=0)


def test_fwb_start_with_caches_on_needs_no_trap():
    machine = _boot(_layout("running", caches_on=True), config=attrs.evolve(CONFIG, fwb=True, idc=True))
    assert machine.platform.tvm == [False, False]
