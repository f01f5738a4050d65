"""Replay files (DESIGN §7).

Every rule argument of the machine — hardware choices included — is recorded,
so a failing program is a list of ``(rule, kwargs)`` that re-runs exactly,
without Hypothesis. The machine writes ``<dir>/<candidate>.json`` (replay) and
``<dir>/<candidate>.md`` (the report, :mod:`conformance.report`) on every
failing program, candidate errors included; Hypothesis runs the shrunk program
last, so what stays on disk is the shrunk one. ``<dir>`` is
``$STAGE2_FAILURES_DIR`` or ``./stage2-failures``.

A replay file (format 2) is a JSON object with:

``format``, ``suite_version``, ``hypothesis_version``
``candidate``, ``candidate_version``
``config``, ``layout``      the VM configuration and memslot/VMA layout (also
                            the arguments of the first step, ``boot``)
``settings``                the Hypothesis settings of the run that found it
                            (``null`` when it was not found by Hypothesis)
``failure``                 ``{property, message, step, kind}``
``steps``                   ``[{rule, args}]``, ``boot`` first
``trace``                   the step labels, ``"N: rule(args)"``
``observations``            ``[{step, observer, expected, observed}]`` for every
                            guest access and VMM read
``state``                   ``{ipas, tree, tlbs, leaves}``: text lines describing
                            the stage-2 tables and TLBs at the failure
``counters``                the cost counters of the failing program

:func:`replay` re-runs one (the CLI: ``stage2-conformance replay FILE``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable

import attrs

from conformance.errors import CandidateError, ConformanceFailure, PropertyViolation
from conformance.protocol import Memslot, VmConfig
from strategies.layouts import Layout, Vma

FORMAT = 2
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


def _versions() -> dict:
    from importlib.metadata import version as dist_version

    import hypothesis

    try:
        suite_version = dist_version("stage2-conformance")
    except Exception:  # running from a source tree
        suite_version = "unknown"
    return {"suite_version": suite_version, "hypothesis_version": hypothesis.__version__}


def hypothesis_settings(machine=None) -> dict | None:
    """The settings of the Hypothesis test running right now (Hypothesis
    makes them the default while a test case executes), or ``None`` outside
    Hypothesis. ``seed`` is the forced seed if any (``runner.run(seed=)``,
    ``--hypothesis-seed``)."""
    from hypothesis.control import currently_in_test_context

    if not currently_in_test_context():
        return None
    from hypothesis import core
    from hypothesis import settings as Settings

    s = Settings.default
    seed = getattr(type(machine), "_hypothesis_internal_use_seed", None) \
        if machine is not None else None
    if seed is None:
        seed = core.global_force_seed
    deadline = s.deadline
    return {
        "max_examples": s.max_examples,
        "stateful_step_count": s.stateful_step_count,
        "derandomize": s.derandomize,
        "seed": seed,
        "database": describe_database(s.database),
        "phases": [p.name for p in s.phases],
        "deadline": None if deadline is None else str(deadline),
        "report_multiple_bugs": s.report_multiple_bugs,
        "suppress_health_check": sorted(h.name for h in s.suppress_health_check),
        "backend": getattr(s, "backend", "hypothesis"),
    }


def describe_database(db) -> str | None:
    """A short description of an example database (no connection internals)."""
    if db is None:
        return None
    name = type(db).__name__
    inner = getattr(db, "_wrapped", None)
    if name == "MultiplexedDatabase" and inner is not None:
        return f"{name}({', '.join(describe_database(d) for d in inner)})"
    if name == "ReadOnlyDatabase" and hasattr(db, "_wrapped"):
        return f"{name}({describe_database(db._wrapped)})"
    if hasattr(db, "path"):
        return f"{name}({db.path})"
    client = getattr(db, "redis", None)
    if client is not None:
        try:
            kw = client.connection_pool.connection_kwargs
            return f"{name}(redis://{kw.get('host', '?')}:{kw.get('port', '?')})"
        except Exception:  # noqa: BLE001
            return name
    return name


def replay_document(candidate: str, candidate_cls: type, failure: ConformanceFailure,
                    calls: list, trace: list[str], counters: dict, machine=None,
                    settings: dict | None = None) -> dict:
    """The replay document of a failing program. With ``machine`` (at the
    failure) it also records the observations and the table/TLB state."""
    from conformance import report

    boot = dict(calls[0][1]) if calls and calls[0][0] == "boot" else {}
    doc = {
        "format": FORMAT,
        **_versions(),
        "candidate": candidate,
        "candidate_version": str(getattr(candidate_cls, "version", "0")),
        "config": encode(boot.get("config")),
        "layout": encode(boot.get("layout")),
        "settings": settings,
        "failure": {"property": failure.property, "message": failure.message,
                    "step": failure.step,
                    "kind": getattr(failure, "kind", None)},
        "steps": [{"rule": name, "args": encode(kwargs)} for name, kwargs in calls],
        "trace": list(trace),
        "observations": [],
        "state": {},
        "counters": dict(counters),
    }
    if machine is not None:
        step_no = report._step_number(failure.step)
        doc["observations"] = report.observations(machine)
        doc["state"] = report.state_at_failure(machine, failure.message, step_no, calls)
    return doc


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
    """The :class:`conformance.report.Report` last written to ``json_path`` in
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
    from conformance import report

    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / f"{_safe(name)}.json").absolute()
    md = path.with_suffix(".md")
    _write_atomically(path, json.dumps(doc, indent=1) + "\n")
    rep = report.from_doc(doc, replay_path=_display(path), report_path=_display(md))
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


def _display(path: Path) -> str:
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
    what :mod:`conformance.polish` removed."""
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
        "format": FORMAT, **_versions(), "candidate": name, "candidate_version": None,
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
    """The Markdown report of a replay document (see :mod:`conformance.report`)."""
    from conformance import report

    if machine is not None and not doc.get("state"):
        failure = doc["failure"]
        calls = [(s["rule"], s["args"]) for s in doc["steps"]]
        doc = {**doc, "observations": report.observations(machine),
               "state": report.state_at_failure(
                   machine, failure["message"], report._step_number(failure["step"]),
                   calls)}
    return report.markdown(report.from_doc(doc))


# ------------------------------------------------------------------- replay
def load(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "steps" not in doc or "candidate" not in doc:
        raise ValueError(f"{path} is not a stage2-conformance replay file")
    return doc


def decode_steps(doc: dict) -> list[tuple[str, dict]]:
    """The ``(rule, kwargs)`` calls of a replay document, ``boot`` first."""
    return [(step["rule"], {k: decode(v) for k, v in step["args"].items()})
            for step in doc["steps"]]


def replay_machine(path_or_doc, candidate_cls: type | None = None,
                   candidate: str | None = None):
    """Re-run a replay file step by step, without Hypothesis and without
    writing failure files. Returns ``(RunResult, machine, doc)`` where
    ``doc`` is the replay document of this run (its failure, observations and
    state are the replay's own; ``failure`` is ``None`` when it passed)."""
    import time

    from conformance.polish import play
    from conformance.registry import load as load_candidate
    from conformance.runner import RunResult

    doc = path_or_doc if isinstance(path_or_doc, dict) else load(path_or_doc)
    name = candidate or doc["candidate"]
    cls = candidate_cls or load_candidate(name)
    start = time.perf_counter()
    exc, machine = play(name, cls, decode_steps(doc))
    if exc is not None:
        status = "error" if isinstance(exc, CandidateError) else "fail"
        counters = dict(machine.platform.counters) if machine.platform else {}
        result = RunResult(name, status, time.perf_counter() - start, exc,
                           list(machine.trace), counters)
        out = replay_document(name, cls, exc, machine.calls, machine.trace, counters,
                              machine=machine, settings=doc.get("settings"))
        return result, machine, out
    counters = dict(machine.platform.counters) if machine.platform else {}
    result = RunResult(name, "pass", time.perf_counter() - start, None,
                       list(machine.trace), counters)
    out = {**doc, "candidate": name, "failure": None, "trace": list(machine.trace),
           "observations": [], "state": {}, "counters": counters}
    return result, machine, out


def replay(path: str | Path, candidate_cls: type | None = None,
           candidate: str | None = None):
    """Re-run a replay file step by step; returns a ``RunResult``."""
    return replay_machine(path, candidate_cls, candidate)[0]


__all__ = ["replay", "replay_machine", "decode_steps", "write_failure", "markdown_report", "load",
           "PropertyViolation", "failures_dir", "written_since", "current_seq",
           "last_report", "not_writing", "listeners", "write_import_error"]
