"""Re-running a replay file (``stage2-conformance replay FILE``): the
recorded steps, boot first, without Hypothesis and without writing files."""

from __future__ import annotations

import time
from pathlib import Path

from conformance.errors import CandidateError
from conformance.failures.document import decode_steps, load, replay_document
from conformance.failures.polish import play
from conformance.machines.result import RunResult
from conformance.registry import load as load_candidate


def replay_machine(path_or_doc, candidate_cls: type | None = None,
                   candidate: str | None = None):
    """Re-run a replay file step by step, without Hypothesis and without
    writing failure files. Returns ``(RunResult, machine, doc)`` where
    ``doc`` is the replay document of this run (its failure, observations and
    state are the replay's own; ``failure`` is ``None`` when it passed)."""
    doc = path_or_doc if isinstance(path_or_doc, dict) else load(path_or_doc)
    name = candidate or doc["candidate"]
    cls = candidate_cls or load_candidate(name)
    start = time.perf_counter()
    exc, machine = play(name, cls, decode_steps(doc), doc.get("machine", "sequential"))
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
