"""Failure reports (DESIGN §7): expected vs observed per step, the stage-2 walk
and TLB entries for the IPAs of the failing step, cost counters; rendered as
Markdown, plain text and rich."""

from __future__ import annotations

import io
import json

import pytest

from candidates.mutants import MUTANTS
from conformance.failures import document, files, report, state
from conformance.runner import run

NAME = "mutant-no-cmo-on-map"


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """One real failure: the mutant that maps pages without cleaning them,
    caught by the guest reading garbage with its caches off."""
    directory = tmp_path_factory.mktemp("failures")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STAGE2_FAILURES_DIR", str(directory))
        result = run(NAME, MUTANTS[NAME], profile="ci", max_examples=100)
    assert result.status == "fail", result
    path = directory / f"{NAME}.json"
    return result, path, json.loads(path.read_text())


def test_document_records_settings_config_observations_and_state(found):
    result, _path, doc = found
    assert doc["format"] == document.FORMAT
    assert doc["settings"]["max_examples"] == 100
    assert doc["settings"]["derandomize"] is True
    assert "shrink" in doc["settings"]["phases"]
    assert doc["hypothesis_version"]
    assert doc["config"]["__type__"] == "VmConfig"
    assert doc["layout"]["__type__"] == "Layout"
    assert doc["steps"][0]["args"]["config"] == doc["config"]
    failing = int(doc["failure"]["step"].split(":")[0])
    seen = [o for o in doc["observations"] if o["step"] == failing]
    assert seen, doc["observations"]
    assert seen[-1]["observed"] != seen[-1]["expected"]
    assert "IPA 0x" in seen[-1]["observer"]
    assert doc["state"]["ipas"], doc["state"]
    assert doc["counters"] == result.counters


def test_report_names_the_property_and_shows_expected_vs_observed(found):
    result, _path, doc = found
    rep = report.from_doc(doc)
    assert rep.property == result.failed_property == "guest-observation"
    assert rep.status == "fail"
    failed = [r for r in rep.rows if r.failed]
    assert len(failed) == 1 and failed[0].number == int(doc["failure"]["step"].split(":")[0])
    row = failed[0]
    assert row.observer and row.expected and row.observed
    assert row.observed not in row.expected.split(" or ")
    assert rep.rows[0].call.startswith("boot")
    assert rep.layout and "slot0" in rep.layout and "VMAs" in rep.layout


def test_report_shows_the_walk_and_the_tlbs_for_the_failing_ipa(found):
    _result, _path, doc = found
    rep = report.from_doc(doc)
    ipa = rep.ipas[0]
    assert rep.tree[0].startswith(f"IPA {ipa}")
    levels = [line.split()[0] for line in rep.tree[1:] if line.startswith("  L")]
    assert levels and levels == sorted(levels)  # PGD first, down to the leaf
    assert any("PGD" in line for line in rep.tree)
    assert any("AF" in line and "Normal" in line for line in rep.tree)  # perms, AF, type
    assert rep.tlbs[0].startswith("vCPU0:")
    assert any(ipa in line for line in rep.tlbs[1:])
    assert rep.leaves and "live table pages" in rep.leaves[0]


def test_markdown_report_is_written_next_to_the_replay(found):
    result, path, _doc = found
    md = path.with_suffix(".md").read_text()
    assert md.count(f"[{result.failed_property}]") == 1
    assert "| # | step | observation | expected | observed |" in md
    assert "## Stage-2 tables at the failing step" in md
    assert "## TLBs at the failing step" in md
    assert "## Cost counters" in md
    assert "## Hypothesis settings" in md
    assert f"stage2-conformance replay {files.display(path)}" in md


def test_plain_text_and_rich(found):
    _result, path, doc = found
    rep = report.from_doc(doc, replay_path=str(path))
    plain = report.text(rep)
    assert plain.startswith(f"FAIL {NAME}: [guest-observation]")
    assert "✗" in plain and "expected" in plain and "observed" in plain
    assert f"replay: stage2-conformance replay {path}" in plain

    buf = io.StringIO()
    report.show(rep, file=buf)  # not a terminal: plain text
    assert buf.getvalue() == plain

    from rich.console import Console

    term = io.StringIO()
    Console(file=term, force_terminal=True, width=160).print(report.renderable(rep))
    out = term.getvalue()
    assert "\x1b[" in out and "guest-observation" in out and "stage-2 tables" in out


def test_last_report_is_kept_for_the_written_file(found):
    _result, path, _doc = found
    rep = files.last_report(path)
    assert rep is not None and rep.candidate == NAME
    assert rep.report_path.endswith(".md")


def test_involved_ipas_from_the_message():
    class Slot:
        id, base_gfn, npages, userspace_addr = 0, 0x40000, 0x400, 0x7f0000000000

    class P:
        memslots = {0: Slot()}

    class M:
        platform = P()
        observations = []

    msg = ("lost dirty gfn(s) 0x40001, 0x40002 ... IPA 0x40003000 ... "
           "VMM read of hva 0x7f0000004000")
    assert state.involved_ipas(M(), msg, None, []) == [
        0x40003000, 0x40001000, 0x40002000, 0x40004000]


def test_format_1_documents_still_give_a_report():
    doc = {"format": 1, "candidate": "x", "failure": {
        "property": "tlb-conflict", "message": "m", "step": "2: guest_read(vcpu=0, where=1)",
        "kind": None}, "steps": [], "trace": ["1: boot(config=..., layout=...)",
                                             "2: guest_read(vcpu=0, where=1)"],
        "counters": {"gup": 1}}
    rep = report.from_doc(doc)
    assert [r.failed for r in rep.rows] == [False, True]
    assert "**[tlb-conflict]** m" in report.markdown(rep)


def test_report_shows_the_cache_lines_behind_the_failing_address(found):
    """A map without clean+invalidate: the page behind the IPA still has the
    host's zeroes in a dirty D-line over never-written memory at PoC, which is
    what the guest (caches off) read."""
    _result, _path, doc = found
    caches = doc["state"]["caches"]
    assert any("stage 2 maps IPA" in line for line in caches), caches
    assert any("PoC -1 (never-written memory (garbage))" in line
               and "D-line 0 (zero (a fresh page)) dirty" in line for line in caches), caches
    rep = report.from_doc(doc)
    assert rep.caches == caches
    assert "## Caches at the failing step" in report.markdown(rep)
    assert "caches at the failing step:" in report.text(rep)
