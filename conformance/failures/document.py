"""Replay files (DESIGN §7).

Every rule argument of the machine — hardware choices included — is recorded,
so a failing program is a list of ``(rule, kwargs)`` that re-runs exactly,
without Hypothesis (:mod:`conformance.failures.replay`). The files are written
by :mod:`conformance.failures.files`.

A replay file (format 3; format 2 files, without ``machine`` and
``interleavings``, still replay) is a JSON object with:

``format``, ``suite_version``, ``hypothesis_version``
``candidate``, ``candidate_version``
``machine``                 ``sequential`` or ``parallel`` (absent: sequential);
                            a parallel step is the rule ``parallel`` with its
                            ``ops`` (``OpSpec``) and ``schedule`` (``Schedule``
                            of ``Preemption``), so it replays exactly
``interleavings``           for the parallel machine: the realized interleaving
                            of every parallel step, in order (one text line per
                            scheduling decision: decision, task, point, detail)
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
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from conformance.errors import ConformanceFailure
from conformance.failures import state
from conformance.machines.parallel import OpSpec
from conformance.platform.scheduler import Preemption, Schedule
from conformance.protocol import Memslot, VmConfig
from strategies.layouts import Layout, Vma

FORMAT = 3
_TYPES = {cls.__name__: cls for cls in (VmConfig, Layout, Memslot, Vma, OpSpec, Schedule,
                                        Preemption)}

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


def versions() -> dict:
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
    boot = dict(calls[0][1]) if calls and calls[0][0] == "boot" else {}
    doc = {
        "format": FORMAT,
        **versions(),
        "candidate": candidate,
        "candidate_version": str(getattr(candidate_cls, "version", "0")),
        "machine": getattr(machine, "kind", "sequential"),
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
    if getattr(machine, "interleavings", None):
        doc["interleavings"] = [list(run) for run in machine.interleavings]
    if machine is not None:
        step_no = state.step_number(failure.step)
        doc["observations"] = state.observations(machine)
        doc["state"] = state.state_at_failure(machine, failure.message, step_no, calls)
    return doc



def load(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "steps" not in doc or "candidate" not in doc:
        raise ValueError(f"{path} is not a stage2-conformance replay file")
    return doc


def decode_steps(doc: dict) -> list[tuple[str, dict]]:
    """The ``(rule, kwargs)`` calls of a replay document, ``boot`` first."""
    return [(step["rule"], {k: decode(v) for k, v in step["args"].items()})
            for step in doc["steps"]]
