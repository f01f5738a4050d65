"""Failure files (DESIGN §7): the replay JSON and the Markdown report.

The machine publishes every failing program (candidate errors included) to
its failure listeners; :func:`write_failure` is one, registered when this
module is imported, and writes ``<dir>/<candidate>.json`` (the replay document,
:mod:`conformance.failures.document`) and ``<dir>/<candidate>.md`` (the
report, :mod:`conformance.failures.report`). Hypothesis runs the shrunk program
last, so what stays on disk is the shrunk one. ``<dir>`` is
``$STAGE2_FAILURES_DIR`` or ``./stage2-failures``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable

from conformance.errors import CandidateError, ConformanceFailure
from conformance.failures import report, state
from conformance.failures.document import (
    FORMAT, hypothesis_settings, replay_document, versions)
from conformance.machines.steps import FAILURE_LISTENERS


def failures_dir() -> Path:
    return Path(os.environ.get("STAGE2_FAILURES_DIR", "stage2-failures"))


# ------------------------------------------------------------ failure files
_seq = itertools.count(1)
_counter = 0
#: str(json path) -> (sequence number of the last write, str(md path))
_written: dict[str, tuple[int, str]] = {}
#: str(json path) -> the report last written there
_reports: dict[str, "object"] = {}
#: Called as ``listener(machine, failure, json_path)`` after every write.
listeners: list[Callable] = []
_suspended = 0


def current_seq() -> int:
    """A mark: :func:`written_since` lists the files written after it."""
    return _counter


def written_since(mark: int) -> list[tuple[str, str]]:
    """``(json path, md path)`` of every failure file written after ``mark``,
    oldest first (each path once, at its last write)."""
    rows = sorted((seq, j, m) for j, (seq, m) in _written.items() if seq > mark)
    return [(j, m) for _seq_no, j, m in rows]


def last_report(json_path: str | Path):
    """The :class:`conformance.failures.report.Report` last written to ``json_path`` in
    this process, or ``None``."""
    return _reports.get(str(json_path))


@contextlib.contextmanager
def not_writing():
    """Within: failing programs write no files (replays use this)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _store(directory: Path, name: str, doc: dict) -> tuple[Path, Path]:
    global _counter
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / f"{_safe(name)}.json").absolute()
    md = path.with_suffix(".md")
    _write_atomically(path, json.dumps(doc, indent=1) + "\n")
    rep = report.from_doc(doc, replay_path=display(path), report_path=display(md))
    _write_atomically(md, report.markdown(rep))
    _counter = next(_seq)
    _written[str(path)] = (_counter, str(md))
    _reports[str(path)] = rep
    return path, md


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename: two processes failing on the same
    candidate (pytest -n) leave one complete file, never an interleaving."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def display(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_failure(machine, failure: ConformanceFailure, *, settings: dict | None = None,
                  deleted_steps: int = 0) -> Path | None:
    """Write the replay JSON and the Markdown report; never raises.
    ``settings`` defaults to the running Hypothesis test's (kept on the
    machine as ``run_settings`` for a later rewrite); ``deleted_steps`` is
    what :mod:`conformance.failures.polish` removed."""
    if _suspended:
        return None
    path = None
    try:
        name = getattr(machine, "candidate_name", machine.candidate_cls.__name__)
        counters = machine.platform.counters if machine.platform else {}
        settings = settings if settings is not None else hypothesis_settings(machine)
        machine.run_settings = settings
        doc = replay_document(name, machine.candidate_cls, failure, machine.calls,
                              machine.trace, counters, machine=machine,
                              settings=settings)
        if deleted_steps:
            doc["deleted_steps"] = deleted_steps
        path, _md = _store(failures_dir(), name, doc)
    except Exception as exc:  # a report must never turn a failure into a crash
        import sys
        print(f"stage2-conformance: could not write the failure files: {exc!r}",
              file=sys.stderr)
    for listener in list(listeners):
        listener(machine, failure, path)
    return path


def write_import_error(name: str, error: Exception) -> Path | None:
    """The replay file of a candidate that cannot be imported: no steps; its
    replay is the import, which fails the same way (a candidate error)."""
    failure = CandidateError("import", str(error), step="0: import")
    doc = {
        "format": FORMAT, **versions(), "candidate": name, "candidate_version": None,
        "config": None, "layout": None, "settings": None,
        "failure": {"property": failure.property, "message": failure.message,
                    "step": failure.step, "kind": failure.kind},
        "steps": [], "trace": [], "observations": [], "state": {}, "counters": {},
    }
    try:
        return _store(failures_dir(), name, doc)[0]
    except OSError:
        return None


def markdown_report(doc: dict, machine=None) -> str:
    """The Markdown report of a replay document (see :mod:`conformance.failures.report`)."""
    if machine is not None and not doc.get("state"):
        failure = doc["failure"]
        calls = [(s["rule"], s["args"]) for s in doc["steps"]]
        doc = {**doc, "observations": state.observations(machine),
               "state": state.state_at_failure(
                   machine, failure["message"], state.step_number(failure["step"]),
                   calls)}
    return report.markdown(report.from_doc(doc))




if write_failure not in FAILURE_LISTENERS:
    FAILURE_LISTENERS.append(write_failure)
