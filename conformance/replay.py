"""Replay files and failure reports.

Every rule argument of the machine — hardware choices included — is recorded,
so a failing program is a list of ``(rule, kwargs)`` that re-runs exactly,
without Hypothesis. The machine writes ``<dir>/<candidate>.json`` (replay) and
``<dir>/<candidate>.md`` (report) on every failing program; Hypothesis runs the
shrunk program last, so what stays on disk is the shrunk one. ``<dir>`` is
``$STAGE2_FAILURES_DIR`` or ``./stage2-failures``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from conformance.errors import CandidateError, ConformanceFailure, PropertyViolation
from conformance.protocol import Memslot, VmConfig
from strategies.layouts import Layout, Vma

FORMAT = 1
_TYPES = {cls.__name__: cls for cls in (VmConfig, Layout, Memslot, Vma)}


def failures_dir() -> Path:
    return Path(os.environ.get("STAGE2_FAILURES_DIR", "stage2-failures"))


def encode(value):
    if attrs.has(type(value)):
        fields = {f.name: encode(getattr(value, f.name)) for f in attrs.fields(type(value))}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(value):
    if isinstance(value, dict) and "__type__" in value:
        cls = _TYPES[value["__type__"]]
        kwargs = {k: decode(v) for k, v in value.items() if k != "__type__"}
        for f in attrs.fields(cls):  # tuples were written as lists
            if f.name in kwargs and isinstance(kwargs[f.name], list):
                kwargs[f.name] = tuple(kwargs[f.name])
        return cls(**kwargs)
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def replay_document(candidate: str, candidate_cls: type, failure: ConformanceFailure,
                    calls: list, trace: list[str], counters: dict) -> dict:
    from importlib.metadata import version as dist_version
    try:
        suite_version = dist_version("stage2-conformance")
    except Exception:  # running from a source tree
        suite_version = "unknown"
    return {
        "format": FORMAT,
        "suite_version": suite_version,
        "candidate": candidate,
        "candidate_version": getattr(candidate_cls, "version", "0"),
        "failure": {"property": failure.property, "message": failure.message,
                    "step": failure.step,
                    "kind": getattr(failure, "kind", None)},
        "steps": [{"rule": name, "args": encode(kwargs)} for name, kwargs in calls],
        "trace": trace,
        "counters": dict(counters),
    }


def write_failure(machine, failure: ConformanceFailure) -> Path | None:
    """Write the replay JSON and the Markdown report; never raises."""
    try:
        directory = failures_dir()
        directory.mkdir(parents=True, exist_ok=True)
        name = getattr(machine, "candidate_name", machine.candidate_cls.__name__)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        counters = machine.platform.counters if machine.platform else {}
        doc = replay_document(name, machine.candidate_cls, failure, machine.calls,
                              machine.trace, counters)
        path = directory / f"{safe}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        (directory / f"{safe}.md").write_text(markdown_report(doc, machine))
        return path
    except Exception as exc:  # a report must never turn a failure into a crash
        import sys
        print(f"stage2-conformance: could not write the failure files: {exc!r}",
              file=sys.stderr)
        return None


def markdown_report(doc: dict, machine=None) -> str:
    f = doc["failure"]
    lines = [f"# stage2-conformance failure: {doc['candidate']}", "",
             f"**[{f['property']}]** {f['message']}", "", f"Failing step: `{f['step']}`", "",
             "| # | step |", "|---|---|"]
    lines += [f"| {i} | `{t.split(': ', 1)[-1]}` |" for i, t in enumerate(doc["trace"], 1)]
    if machine is not None and machine.platform is not None:
        lines += ["", "## Stage-2 tree and TLBs at the failure", "", "```",
                  *machine.platform.describe_state(), "```"]
    if doc["counters"]:
        lines += ["", "## Cost counters", "", "| counter | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(doc["counters"].items())]
    lines += ["", f"Replay: `stage2-conformance replay {failures_dir()}/"
              f"{doc['candidate']}.json`", ""]
    return "\n".join(lines)


def replay(path: str | Path, candidate_cls: type | None = None,
           candidate: str | None = None):
    """Re-run a replay file step by step; returns a ``RunResult``."""
    import time

    from conformance.machine import machine_for
    from conformance.registry import load
    from conformance.runner import RunResult

    doc = json.loads(Path(path).read_text())
    name = candidate or doc["candidate"]
    cls = candidate_cls or load(name)
    machine = machine_for(name, cls)()
    start = time.perf_counter()
    try:
        for step in doc["steps"]:
            kwargs = {k: decode(v) for k, v in step["args"].items()}
            getattr(machine, step["rule"])(**kwargs)
        machine.teardown()
    except ConformanceFailure as exc:
        status = "error" if isinstance(exc, CandidateError) else "fail"
        return RunResult(name, status, time.perf_counter() - start, exc, machine.trace,
                         dict(machine.platform.counters) if machine.platform else {})
    return RunResult(name, "pass", time.perf_counter() - start, None, machine.trace)


__all__ = ["replay", "write_failure", "markdown_report", "PropertyViolation"]
