"""A failure found by Hypothesis is written as a replay file that re-runs
without Hypothesis: it fails the same way against the buggy candidate and
passes against the fixed one. Candidate errors are written and replayed too."""

from __future__ import annotations

import json

import pytest

import conformance.platform.calls
from candidates.mutants import MUTANTS
from candidates.reference import ReferenceCandidate
from conformance import cli, registry
from conformance.failures import files
from conformance.failures import replay as replay_mod
from conformance.failures.replay import replay
from conformance.runner import run


def test_replay_round_trip(tmp_path):
    name = "mutant-no-cmo-on-map"
    found = run(name, MUTANTS[name], profile="ci", max_examples=100)
    assert found.status == "fail"
    path = tmp_path / f"{name}.json"
    doc = json.loads(path.read_text())
    assert doc["candidate"] == name
    assert doc["failure"]["property"] == found.failed_property
    assert doc["steps"][0]["rule"] == "boot"
    assert (tmp_path / f"{name}.md").read_text().count(f"[{found.failed_property}]") == 1

    again = replay(path, MUTANTS[name])
    assert again.status == "fail"
    assert str(again.failure) == str(found.failure)

    fixed = replay(path, ReferenceCandidate, candidate="reference")
    assert fixed.status == "pass", fixed.failure


def test_a_replay_writes_no_failure_files(tmp_path):
    name = "mutant-no-cmo-on-map"
    run(name, MUTANTS[name], profile="ci", max_examples=100)
    path = tmp_path / f"{name}.json"
    before = path.read_text()
    mark = files.current_seq()
    result, machine, doc = replay_mod.replay_machine(path, MUTANTS[name])
    assert result.status == "fail"
    assert files.written_since(mark) == []
    assert path.read_text() == before
    # the replay's own document carries its observations and table state
    assert doc["observations"] and doc["state"]["tree"]
    assert doc["settings"] == json.loads(before)["settings"]


# --------------------------------------------------------- candidate errors
class RaisesOnFault(ReferenceCandidate):
    def handle_guest_abort(self, vcpu, fault):
        raise RuntimeError("boom in the fault path")


class ReturnsGarbage(ReferenceCandidate):
    def handle_guest_abort(self, vcpu, fault):
        super().handle_guest_abort(vcpu, fault)
        return "resume"


class BrokenConstructor(ReferenceCandidate):
    def __init__(self, services, config):
        raise ValueError("cannot build")


class NeverReturns(ReferenceCandidate):
    def handle_guest_abort(self, vcpu, fault):
        while True:
            pass


@pytest.mark.parametrize("cls, kind", [(RaisesOnFault, "raised"),
                                       (ReturnsGarbage, "bad-return"),
                                       (BrokenConstructor, "raised")])
def test_candidate_errors_are_written_and_replay_as_candidate_errors(cls, kind, tmp_path):
    found = run(cls.__name__, cls, profile="ci", max_examples=30)
    assert found.status == "error" and found.failure.kind == kind
    path = tmp_path / f"{cls.__name__}.json"
    doc = json.loads(path.read_text())
    assert doc["failure"] == {"property": "candidate-error", "message": found.failure.message,
                              "step": found.failure.step, "kind": kind}
    md = path.with_suffix(".md").read_text()
    assert f"[candidate-error: {kind}]" in md

    again = replay(path, cls)
    assert again.status == "error"
    assert str(again.failure) == str(found.failure)


def test_a_timeout_replays_as_a_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(conformance.platform.calls, "CALL_TIMEOUT", 0.2)
    monkeypatch.setattr(conformance.platform.calls, "MAX_SERVICE_CALLS", 10**9)
    found = run("NeverReturns", NeverReturns, profile="ci", max_examples=5)
    assert found.status == "error" and found.failure.kind == "timeout"
    again = replay(tmp_path / "NeverReturns.json", NeverReturns)
    assert again.status == "error" and again.failure.kind == "timeout"
    assert again.failure.step == found.failure.step


def test_cli_replay_of_a_candidate_error_exits_2(tmp_path, monkeypatch, capsys):
    run("RaisesOnFault", RaisesOnFault, profile="ci", max_examples=30)
    real = registry.load
    monkeypatch.setattr(registry, "load",
                        lambda name: RaisesOnFault if name == "RaisesOnFault" else real(name))
    code = cli.main(["replay", str(tmp_path / "RaisesOnFault.json")])
    out = capsys.readouterr().out
    assert code == 2, out
    assert "ERROR RaisesOnFault: [candidate-error: raised]" in out
    assert "boom in the fault path" in out
    assert "the same failure as recorded" in out
    # the fixed candidate passes the same program
    assert cli.main(["replay", str(tmp_path / "RaisesOnFault.json"),
                     "--candidate", "reference"]) == 0


def test_an_import_failure_is_written_and_replays_as_one(tmp_path, monkeypatch, capsys):
    broken = registry.EntryPoint(name="broken", value="no_such_module_xyz:X",
                                 group=registry.GROUP)
    monkeypatch.setattr(registry, "available", lambda: {"broken": broken})
    assert cli.main(["run", "--candidate", "broken"]) == 2
    captured = capsys.readouterr()
    assert "[candidate-error: import]" in captured.err
    path = tmp_path / "broken.json"
    doc = json.loads(path.read_text())
    assert doc["failure"]["kind"] == "import" and doc["steps"] == []
    assert "failed to import" in path.with_suffix(".md").read_text()
    assert f"replay {path.name}" in captured.out or str(path) in captured.out

    assert cli.main(["replay", str(path)]) == 2
    out = capsys.readouterr().out
    assert "[candidate-error: import]" in out and "No module named" in out
