"""The known finding block-split-no-cmo (docs/findings.md, rules §6.6): KVM
v6.12 drops the pages of a block it splits at map time without cleaning them,
and a stale clean line can then shadow a guest's non-cacheable write.

The program is the one the finding was found with: kvm-classic (faithful to
v6.12) shows it deterministically, declares it, and is reported, not failed;
the same code without the declaration fails with host-observation; the fixed
candidate and the 4 KiB reference never show it."""

from __future__ import annotations

import json

import pytest

from candidates.classic import ClassicCandidate, ClassicSplitCmoCandidate
from candidates.reference import ReferenceCandidate
from conformance.findings import BLOCK_SPLIT_NO_CMO, FINDINGS, check_declared
from conformance.machines.sequential import machine_for
from conformance.protocol import Memslot, VmConfig
from conformance.failures.replay import replay_machine
from strategies.layouts import Layout, Vma

HVA = 0x4000_0000
#: No FWB, hardware AF, no DIC/IDC, one vCPU.
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=True, dic=False, idc=False, nr_vcpus=1)
#: Slot 0: gfn 0x40000, 512 pages at hva 0x40000000, THP-backed, cold start
#: (caches off). ``where=0`` is gfn 0x40000, ``where=1`` gfn 0x40001.
LAYOUT = Layout((Memslot(0, 0x40000, 512, HVA),), (Vma(HVA, HVA + (512 << 12), True),),
                "cold", False)
COUNTER = f"known finding: {BLOCK_SPLIT_NO_CMO.id}"

WRITE_P = ("guest_write", dict(vcpu=0, where=1, pages=1))     # NC write into a 2 MiB block
LOGGING_ON = ("memslot_logging", dict(which=0, on=True))       # the block turns read-only
SPLIT = ("guest_write", dict(vcpu=0, where=0, pages=1))        # map(4K) splits the block
MIGRATE_P = ("host_mm", dict(op="migrate", where=1, huge=False))  # P is unmapped: no CMO
VMM_READ_P = ("vmm", dict(op="read", where=1))                 # the stale clean line
PROGRAM = [WRITE_P, LOGGING_ON, SPLIT, MIGRATE_P, VMM_READ_P]


class Undeclared(ClassicCandidate):
    """kvm-classic's code without the declaration: the finding is a failure."""

    known_findings = frozenset()


def test_kvm_classic_shows_the_finding_and_is_reported_not_failed(play):
    failure, machine = play(ClassicCandidate, CONFIG, LAYOUT, *PROGRAM)
    assert failure is None, str(failure)
    counters = machine.platform.counters
    assert counters[COUNTER] == 1
    assert counters["pages dropped by a block split without CMO"] == 511
    assert f"known finding: {BLOCK_SPLIT_NO_CMO.id}" in machine.events


def test_without_the_declaration_it_fails_with_host_observation(play):
    failure, _ = play(Undeclared, CONFIG, LAYOUT, *PROGRAM)
    assert failure is not None and failure.property == "host-observation", failure
    assert failure.step.startswith("6: vmm(op='read', where=1)")
    assert "gave 0" in failure.message and "gives 1" in failure.message


def test_a_guest_read_after_the_copy_shows_it_too(play):
    """The copy migration made holds the stale value, so the guest (caches
    off, reading PoC) sees it after the re-fault, whose clean is too late."""
    program = [*PROGRAM[:-1], ("guest_read", dict(vcpu=0, where=1, pages=1))]
    failure, _ = play(Undeclared, CONFIG, LAYOUT, *program)
    assert failure is not None and failure.property == "guest-observation", failure
    failure, machine = play(ClassicCandidate, CONFIG, LAYOUT, *program)
    assert failure is None, str(failure)
    assert machine.platform.counters[COUNTER] == 1


@pytest.mark.parametrize("cls", [ClassicSplitCmoCandidate, ReferenceCandidate],
                         ids=["split-cmo", "reference"])
def test_the_fix_and_the_reference_never_show_it(cls, play):
    failure, machine = play(cls, CONFIG, LAYOUT, *PROGRAM)
    assert failure is None, str(failure)
    counters = machine.platform.counters
    assert counters[COUNTER] == 0
    assert counters["pages dropped by a block split without CMO"] == 0


def test_the_fix_costs_one_block_clean_per_split(play):
    _, classic = play(ClassicCandidate, CONFIG, LAYOUT, *PROGRAM)
    _, fixed = play(ClassicSplitCmoCandidate, CONFIG, LAYOUT, *PROGRAM)
    extra = (fixed.platform.counters["bytes cleaned+invalidated"]
             - classic.platform.counters["bytes cleaned+invalidated"])
    assert extra == 2 << 20  # the old block, once


def test_a_page_cleaned_before_the_host_reads_it_is_no_finding(play):
    """Faulting P back in before the migration cleans+invalidates P's pfn:
    the stale line is gone, nothing to report, nothing fails."""
    program = [WRITE_P, LOGGING_ON, SPLIT, ("guest_read", dict(vcpu=0, where=1, pages=1)),
               MIGRATE_P, VMM_READ_P]
    for cls in (ClassicCandidate, Undeclared):
        failure, machine = play(cls, CONFIG, LAYOUT, *program)
        assert failure is None, str(failure)
        assert machine.platform.counters[COUNTER] == 0


def test_eager_split_keeps_the_pages_mapped(play):
    """With KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE the block is split when logging
    starts, with every page still mapped, so the migration's unmap cleans P."""
    from candidates.classic import ClassicEagerSplitCandidate

    failure, machine = play(ClassicEagerSplitCandidate, CONFIG, LAYOUT, *PROGRAM)
    assert failure is None, str(failure)
    assert machine.platform.counters[COUNTER] == 0


def test_replay_reports_the_finding(tmp_path, capsys):
    """A replay file of the program passes against kvm-classic and says
    which finding it showed; against the undeclared code it fails."""
    from conformance import cli
    from conformance.failures.document import encode

    steps = [("boot", dict(config=CONFIG, layout=LAYOUT)), *PROGRAM]
    doc = {"format": 2, "candidate": "kvm-classic", "config": encode(CONFIG),
           "layout": encode(LAYOUT), "failure": None,
           "steps": [{"rule": r, "args": encode(a)} for r, a in steps]}
    path = tmp_path / "finding.json"
    path.write_text(json.dumps(doc))
    assert cli.main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"known finding {BLOCK_SPLIT_NO_CMO.id}: shown 1 time(s)" in out
    result, _machine, _out = replay_machine(doc, Undeclared, candidate="undeclared")
    assert result.status == "fail" and result.failure.property == "host-observation"


def test_declarations_are_validated():
    assert check_declared(ClassicCandidate) == {BLOCK_SPLIT_NO_CMO.id}
    assert set(FINDINGS) == {BLOCK_SPLIT_NO_CMO.id}

    class Unknown(ClassicCandidate):
        known_findings = frozenset({"no-such-finding"})

    with pytest.raises(ValueError, match="unknown finding.*'no-such-finding'.*docs/findings.md"):
        machine_for("unknown", Unknown)

    class Spelled(ClassicCandidate):
        known_findings = "block-split-no-cmo"  # a string, not a set

    with pytest.raises(TypeError, match="must be a set of finding ids"):
        machine_for("spelled", Spelled)
