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
    assert "first failure after" in out
    assert "[guest-observation]" in out
    assert "counterexample" in out
    assert "1: boot" in out  # the numbered step trace (a warm start may fail in boot)
    assert "✗" in out and "expected" in out  # the failing step, expected vs observed
    assert "stage-2 tables at the failing step" in out
    assert "replay: stage2-conformance replay" in out


@pytest.mark.parametrize("argv", [[], ["run"], ["run", "--candidate", "reference",
                                                "--profile", "nope"], ["bogus"]])
def test_usage_errors_return_2(argv, capsys):
    assert cli.main(argv) == 2


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["run", "--help"],
                                  ["matrix", "--help"], ["mutants", "--help"],
                                  ["replay", "--help"], ["explain", "--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    assert "usage: stage2-conformance" in capsys.readouterr().out


def test_run_with_seed(capsys):
    assert cli.main(["run", "--candidate", "reference", "--examples", "2",
                     "--seed", "12345"]) == 0
    assert "seed 12345" in capsys.readouterr().out


def test_run_with_a_bad_shared_db_is_exit_2(capsys):
    assert cli.main(["run", "--candidate", "reference", "--shared-db", "http://x"]) == 2
    assert "expected a Redis URL" in capsys.readouterr().err


# ------------------------------------------------------------------ matrix
def test_matrix_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "m.json", tmp_path / "m.md"
    code = cli.main(["matrix", "--candidate", "reference", "--candidate", "kvm-classic",
                     "--examples", "5", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads(js.read_text())
    assert [(r["candidate"], r["machine"], r["status"]) for r in rows] == [
        ("reference", "sequential", "pass"), ("reference", "parallel", "pass"),
        ("kvm-classic", "sequential", "pass"), ("kvm-classic", "parallel", "pass")]
    for r in rows:
        assert r["examples"] == 5 and r["steps"] > 0 and r["steps_per_second"] > 0
        assert isinstance(r["counters"], dict) and r["counters"]
    # the same programs: counters that only depend on the program agree
    def driven(counters):
        return {k: v for k, v in counters.items() if k.startswith("aging:")}
    for a, b in ((rows[0], rows[2]), (rows[1], rows[3])):
        assert driven(a["counters"]) == driven(b["counters"])
        assert a["steps"] == b["steps"]
    table = md.read_text()
    assert table.startswith("| candidate | machine | status | programs | steps | steps/s")
    assert "| reference | sequential | pass | 5 |" in table
    assert "reference" in out and "kvm-classic" in out and "sequential" in out


def test_matrix_reports_failures_and_unknown_names(tmp_path, capsys):
    js = tmp_path / "m.json"
    code = cli.main(["matrix", "--candidate", "mutant-no-cmo-on-map", "--examples", "100",
                     "--json", str(js)])
    assert code == 1
    (row,) = json.loads(js.read_text())
    assert row["status"] == "fail" and row["property"] == "guest-observation"
    assert row["examples"] >= 1 and row["counters"]
    assert cli.main(["matrix", "--candidate", "no-such"]) == 2
    assert "unknown candidate 'no-such'" in capsys.readouterr().err


def test_matrix_default_is_the_correct_candidates(monkeypatch):
    seen = []
    monkeypatch.setattr(cli.matrix, "matrix_rows", lambda names, *a, **k: seen.extend(names) or [])
    assert cli.main(["matrix"]) == 0
    assert "reference" in seen
    assert not any(name.startswith("mutant-") for name in seen)


# ----------------------------------------------------------------- mutants
def test_mutants_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "mu.json", tmp_path / "mu.md"
    code = cli.main(["mutants", "--candidate", "mutant-no-cmo-on-map", "--seeds", "1",
                     "--examples", "100", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = json.loads(js.read_text())
    assert row["name"] == "mutant-no-cmo-on-map"
    assert row["caught"] is True and row["caught_runs"] == 1
    assert row["property"] == "guest-observation" and row["expected"] is True
    assert row["examples"] >= 1 and row["steps"] >= 0  # 0: caught in a warm boot
    assert 0 < row["generation_seconds"] <= row["seconds"]
    assert row["shrink_seconds"] >= 0
    assert "| mutant-no-cmo-on-map | caught 1/1 | guest-observation | yes |" in md.read_text()
    assert "mutant-no-cmo-on-map" in out


def test_mutants_not_caught_is_exit_1(tmp_path):
    js = tmp_path / "mu.json"
    assert cli.main(["mutants", "--candidate", "reference", "--seeds", "1",
                     "--examples", "2", "--json", str(js)]) == 1
    (row,) = json.loads(js.read_text())
    assert row["caught"] is False and row["examples"] is None


# ------------------------------------------------------------------ replay
def test_replay_exit_codes(failures_dir, capsys):
    assert cli.main(["run", "--candidate", "mutant-no-cmo-on-map", "--examples", "100",
                     "--profile", "ci"]) == 1
    path = failures_dir / "mutant-no-cmo-on-map.json"
    capsys.readouterr()
    assert cli.main(["replay", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL mutant-no-cmo-on-map: [guest-observation]" in out
    assert "the same failure as recorded" in out
    assert "stage-2 tables at the failing step" in out
    assert cli.main(["replay", str(path), "--candidate", "reference"]) == 0
    assert "PASS reference: the recorded program no longer fails" in capsys.readouterr().out
    assert cli.main(["replay", str(path), "--candidate", "no-such"]) == 2
    assert cli.main(["replay", str(failures_dir / "missing.json")]) == 2
    assert "cannot read replay file" in capsys.readouterr().err


# ----------------------------------------------------------------- explain
def test_explain_a_monitor_family(capsys):
    assert cli.main(["explain", "tlb-conflict"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tlb-conflict (monitor)")
    assert "T1 " in out and "T3 " in out  # the cited invariants, quoted
    assert "BBM" in out


def test_explain_an_oracle_family_lists_its_rules(capsys):
    assert cli.main(["explain", "guest-observation"]) == 0
    out = capsys.readouterr().out
    assert "R1 Memory" in out and "R4 Maintenance promises" in out
    assert "G-C1" in out and "§6.5" in out


@pytest.mark.parametrize("name", ["host-observation", "dirty-log-harvest", "candidate-error",
                                  "stale-translation", "R3"])
def test_explain_knows(name, capsys):
    assert cli.main(["explain", name]) == 0
    assert capsys.readouterr().out.startswith(name)


def test_explain_without_a_name_lists_the_families(capsys):
    assert cli.main(["explain"]) == 0
    out = capsys.readouterr().out
    for name in ("break-before-make", "guest-observation", "candidate-error", "refcount"):
        assert name in out


def test_explain_unknown_is_one_line_and_exit_2(capsys):
    assert cli.main(["explain", "no-such-property"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "unknown property 'no-such-property'" in lines[0]
    assert "tlb-conflict" in lines[0] and "guest-observation" in lines[0]


def test_every_property_a_failure_can_name_is_explained():
    """The families raised in the code all have an explanation."""
    import re
    from pathlib import Path

    from conformance.failures import explain

    root = Path(cli.__file__).resolve().parents[1]  # conformance/
    raised = set()
    for path in list(root.rglob("*.py")):
        text = path.read_text()
        raised |= set(re.findall(r'(?:PropertyViolation\(|fail\()\s*"([a-z-]+)"', text))
    assert raised, "no property names found"
    assert raised <= set(explain.family_names()), raised - set(explain.family_names())


# -------------------------------------------------------------- progress
def test_progress_line_renders():
    from rich.spinner import Spinner

    p = cli.common.Progress("reference", "reference (profile dev)")
    p.start = 0.0
    p.spinner = Spinner("dots")
    p.failing = 2
    text = str(p._render().text)
    assert "shrinking" in text and "programs passed" in text


def test_matrix_json_to_standard_output(capsys):
    assert cli.main(["matrix", "--candidate", "reference", "--examples", "2",
                     "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)  # nothing but the JSON
    assert rows[0]["candidate"] == "reference" and rows[0]["status"] == "pass"


def test_replay_of_a_parallel_failure_says_whether_the_interleaving_diverged(tmp_path, capsys):
    """Against the recorded candidate the interleaving is the same; against
    one that takes another path the replay says where it first differs."""
    import json

    from candidates.mutants.classic_mutants import PlainStoreInSharedWalk
    from conformance.failures import document
    from conformance.failures.polish import play
    from conformance.machines.parallel import OpSpec
    from conformance.platform.scheduler import Preemption, Schedule
    from conformance.protocol import Memslot, VmConfig
    from strategies.layouts import Layout, Vma

    hva = 0x4000_0000
    layout = Layout((Memslot(0, 0x40000, 512, hva),), (Vma(hva, hva + (512 << 12), True),),
                    "cold", False)
    steps = [("boot", dict(config=VmConfig(ipa_bits=40, fwb=False, hw_af=True, nr_vcpus=2),
                           layout=layout)),
             ("parallel", dict(where=0, ops=(OpSpec("read", 0), OpSpec("write", 1)),
                               schedule=Schedule((Preemption(0, 1, "pte store", 1),))))]
    name = "mutant-plain-store-in-shared-walk"
    failure, machine = play(name, PlainStoreInSharedWalk, steps, "parallel")
    doc = document.replay_document(name, PlainStoreInSharedWalk, failure, machine.calls,
                                   machine.trace, {}, machine=machine)
    path = tmp_path / "race.json"
    path.write_text(json.dumps(document.encode(doc)))
    capsys.readouterr()
    assert cli.main(["replay", str(path)]) == 1
    assert "the same interleavings as recorded" in capsys.readouterr().out
    assert cli.main(["replay", str(path), "--candidate", "kvm-classic"]) == 0
    out = capsys.readouterr().out
    assert "PASS kvm-classic" in out and "parallel step #1 diverged" in out
