"""A failure found by Hypothesis is written as a replay file that re-runs
without Hypothesis: it fails the same way against the buggy candidate and
passes against the fixed one."""

from __future__ import annotations

import json

from candidates.mutants import MUTANTS
from candidates.reference import ReferenceCandidate
from conformance.replay import replay
from conformance.runner import run


def test_replay_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE2_FAILURES_DIR", str(tmp_path))
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
