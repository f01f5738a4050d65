"""The ``stage2-conformance`` command line, called in-process through main()."""

from __future__ import annotations

import json

import pytest

from candidates.reference import ReferenceCandidate
from conformance import cli, registry


def test_list_shows_reference_and_its_capabilities(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["reference"])
    assert "correct" in line
    assert ReferenceCandidate.capabilities.describe() in line
    assert "candidates.reference:ReferenceCandidate" in line
    mutant = next(line for line in out.splitlines()
                  if line.startswith("mutant-no-tlbi-after-unmap"))
    assert "known bug" in mutant


def test_list_json(capsys):
    assert cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == list(registry.available())
    assert by_name["reference"] == {
        "name": "reference", "kind": "correct",
        "capabilities": ReferenceCandidate.capabilities.describe(),
        "version": ReferenceCandidate.version,
        "entry_point": "candidates.reference:ReferenceCandidate", "error": None}
    assert by_name["mutant-no-cmo-on-map"]["kind"] == "known bug"


def test_list_shows_a_broken_candidate_with_its_error(monkeypatch, capsys):
    real = registry.available()
    broken = registry.EntryPoint(name="broken", value="no_such_module_xyz:X",
                                 group=registry.GROUP)
    monkeypatch.setattr(registry, "available", lambda: {**real, "broken": broken})
    assert cli.main(["list", "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["broken"]
    assert row["kind"] == "error"
    assert "No module named 'no_such_module_xyz'" in row["error"]
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("broken"))
    assert "error" in line and "no_such_module_xyz" in line


def test_run_reference_passes(capsys):
    assert cli.main(["run", "--candidate", "reference", "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS reference")
    assert "3 examples" in out


def test_run_unknown_candidate_is_exit_2_with_one_line(capsys):
    assert cli.main(["run", "--candidate", "no-such-candidate"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "unknown candidate 'no-such-candidate'" in lines[0]
    assert "available candidates:" in lines[0] and "reference" in lines[0]


def test_run_import_error_is_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(registry, "available", lambda: {"broken": registry.EntryPoint(
        name="broken", value="no_such_module_xyz:X", group=registry.GROUP)})
    assert cli.main(["run", "--candidate", "broken"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "failed to import" in err


def test_run_catches_a_known_bug(capsys):
    code = cli.main(["run", "--candidate", "mutant-no-cmo-on-map",
                     "--examples", "100", "--profile", "ci"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.startswith("FAIL mutant-no-cmo-on-map")
    assert "[guest-observation]" in out
    assert "counterexample" in out
    assert "  1: boot(" in out  # the numbered step trace


@pytest.mark.parametrize("argv", [[], ["run"], ["run", "--candidate", "reference",
                                                "--profile", "nope"], ["bogus"]])
def test_usage_errors_return_2(argv, capsys):
    assert cli.main(argv) == 2


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["run", "--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    assert "usage: stage2-conformance" in capsys.readouterr().out


def test_run_with_seed(capsys):
    assert cli.main(["run", "--candidate", "reference", "--examples", "2",
                     "--seed", "12345"]) == 0
    assert "seed 12345" in capsys.readouterr().out
