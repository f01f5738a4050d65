"""Step deletion after Hypothesis's shrink (conformance/failures/polish.py): redundant
steps go, the failure stays the same, the result is 1-minimal, and the
failure files and report say how many steps went."""

from __future__ import annotations

import json

import pytest

from candidates.mutants import MUTANTS
from conformance.failures import document, polish, replay, report
from conformance.errors import CandidateError, PropertyViolation
from conformance.protocol import Memslot, VmConfig
from strategies.layouts import Layout, Vma

NAME = "mutant-relax-no-dirty-mark"
HVA = 0x4000_0000
CONFIG = VmConfig(ipa_bits=40, fwb=False, hw_af=False, dic=False, idc=False, nr_vcpus=1)
LAYOUT = Layout((Memslot(0, 0x40000, 1024, HVA, log_dirty_pages=True),),
                (Vma(HVA, HVA + (1024 << 12) + (2 << 20), True),))
BOOT = ("boot", dict(config=CONFIG, layout=LAYOUT))
READ = ("guest_read", dict(vcpu=0, where=0, pages=1))
CACHES_ON = ("guest_cache_control", dict(vcpu=0, op="caches on"))
WRITE = ("guest_write", dict(vcpu=0, where=0, pages=1))
#: What Hypothesis 6.155 shrank this mutant's ci counterexample to (on the
#: generator of 2026-11-30, before guest_set_way was a rule): the two
#: ``caches on`` steps are 7 choices each, more than its shrinker deletes at once.
SHRUNK = [BOOT, READ, CACHES_ON, CACHES_ON, WRITE]


def test_redundant_steps_are_deleted_and_the_failure_kept():
    cls = MUTANTS[NAME]
    failure, _machine = polish.play(NAME, cls, SHRUNK)
    assert failure is not None and failure.property == "dirty-logging"
    out = polish.delete_steps(NAME, cls, SHRUNK, failure)
    assert out is not None
    assert list(out.calls) == [BOOT, READ, WRITE] and out.deleted == 2
    assert polish.same_failure(out.failure, failure)
    assert out.failure.step == "3: guest_write(vcpu=0, where=0, pages=1)"


def test_the_result_is_one_minimal():
    cls = MUTANTS[NAME]
    failure, _ = polish.play(NAME, cls, SHRUNK)
    out = polish.delete_steps(NAME, cls, SHRUNK, failure)
    for i in range(1, len(out.calls)):
        got, _ = polish.play(NAME, cls, out.calls[:i] + out.calls[i + 1:])
        assert got is None or not polish.same_failure(got, failure), i
    assert polish.delete_steps(NAME, cls, out.calls, out.failure) is None


def test_a_different_failure_is_not_the_same_bug():
    a = PropertyViolation("dirty-logging", "x")
    assert polish.same_failure(a, PropertyViolation("dirty-logging", "other text"))
    assert not polish.same_failure(a, PropertyViolation("stale-translation", "x"))
    assert not polish.same_failure(CandidateError("raised", "x"),
                                   CandidateError("timeout", "x"))


def test_deletion_stops_at_the_attempt_budget():
    cls = MUTANTS[NAME]
    failure, _ = polish.play(NAME, cls, SHRUNK)
    assert polish.delete_steps(NAME, cls, SHRUNK, failure, max_attempts=1) is None  # WRITE is needed


def test_after_failure_rewrites_the_files_for_the_shorter_program(tmp_path, monkeypatch):
    cls = MUTANTS[NAME]
    failure, machine = polish.play(NAME, cls, SHRUNK)
    machine.run_settings = {"max_examples": 300}
    got, trace, shorter = polish.after_failure(NAME, cls, (failure, list(machine.trace), machine))
    assert got.property == "dirty-logging" and len(shorter.calls) == 3
    doc = json.loads((tmp_path / f"{NAME}.json").read_text())
    assert doc["deleted_steps"] == 2 and len(doc["steps"]) == 3
    assert doc["settings"] == {"max_examples": 300}
    text = report.text(report.from_doc(doc))
    assert "counterexample (2 step(s) after boot; 2 more deleted after Hypothesis's shrink" in text
    # The replay file replays to the same failure.
    result = replay.replay(tmp_path / f"{NAME}.json", cls)
    assert result.status == "fail" and result.failure.property == "dirty-logging"


def test_after_failure_keeps_a_program_with_nothing_to_delete(tmp_path, monkeypatch):
    cls = MUTANTS[NAME]
    minimal = [BOOT, READ, WRITE]
    failure, machine = polish.play(NAME, cls, minimal)
    found = (failure, list(machine.trace), machine)
    assert polish.after_failure(NAME, cls, found) is found
    assert not list(tmp_path.iterdir())  # nothing rewritten


pytest_plugins = ["pytester"]


@pytest.mark.parametrize("how", ["runner", "pytest"])
def test_every_failure_file_holds_a_one_minimal_program(how, tmp_path, monkeypatch, pytester):
    """Whatever Hypothesis shrinks to, the replay file's program is 1-minimal,
    from ``stage2-conformance run`` and from pytest alike. (With Hypothesis
    6.155 and today's generator, ci's shrunk program for this mutant keeps one
    removable step, so both paths must run the deletion pass to pass this.)"""
    name = "mutant-harvest-no-reprotect"
    cls = MUTANTS[name]
    if how == "runner":
        from conformance.runner import run
        assert run(name, cls, profile="ci").status == "fail"
    else:
        out = pytester.runpytest_subprocess("--candidate", name, "--hypothesis-profile", "ci",
                                            "-p", "no:randomly", "-p", "no:cacheprovider")
        out.assert_outcomes(failed=1)
        out.stdout.fnmatch_lines(["*stage2-conformance report*", "*counterexample (*"])
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    calls = document.decode_steps(doc)
    failure, _ = polish.play(name, cls, calls)
    assert failure is not None and failure.property == "dirty-logging"
    assert polish.delete_steps(name, cls, calls, failure) is None


def test_a_timeout_is_not_replayed(monkeypatch):
    """Each replay of a hang would wait out the timeout again: left as is."""
    import types

    played = []
    monkeypatch.setattr(polish, "play", lambda *a: played.append(a) or (None, None))
    failure = CandidateError("timeout", "did not return")
    found = (failure, [], types.SimpleNamespace(calls=[BOOT, READ]))
    assert polish.after_failure("hang", MUTANTS[NAME], found) is found
    assert played == []
    raised = (CandidateError("raised", "boom"), [], types.SimpleNamespace(calls=[BOOT, READ]))
    polish.after_failure("boom", MUTANTS[NAME], raised)
    assert len(played) == 1  # other candidate errors are shortened like any failure


def test_a_crash_while_deleting_keeps_the_found_failure(monkeypatch, capsys):
    import types

    def broken(*a):
        raise KeyError("harness bug")

    monkeypatch.setattr(polish, "play", broken)
    found = (PropertyViolation("dirty-logging", "x"), [],
             types.SimpleNamespace(calls=[BOOT, READ, WRITE]))
    assert polish.after_failure(NAME, MUTANTS[NAME], found) is found
    assert "step deletion skipped: KeyError('harness bug')" in capsys.readouterr().err
