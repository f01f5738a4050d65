"""Run the conformance machine against one candidate, outside pytest.

Used by the CLI, the mutant tests and the benchmarks. A run ends with a
:class:`RunResult`: passed, or the (shrunk) failure with its step trace.
"""

from __future__ import annotations

import time

from hypothesis import settings as Settings
from hypothesis.stateful import run_state_machine_as_test

from conformance.errors import CandidateError, ConformanceFailure
from conformance import profiles
from conformance.failures import polish
from conformance.machines.result import RunResult
from conformance.machines.parallel import machine_class


def run(name: str, candidate_cls: type, settings: Settings | None = None,
        profile: str = "dev", seed: int | None = None, same_programs: bool = False,
        machine: str = "sequential", **overrides) -> RunResult:
    """Run the sequential machine for ``candidate_cls`` under ``profile`` (or
    explicit ``settings``) with optional settings ``overrides``. ``seed``
    makes a random (non-derandomized) run reproducible.

    On a pass, ``counters`` are the cost counters summed over every program
    (the same programs for every candidate under the same profile and seed,
    since the machine's rules do not depend on the candidate): with
    ``same_programs`` every candidate runs the identical derandomized or seeded
    programs, for cost comparisons."""
    base = settings or profiles.PROFILES[profile]
    if seed is not None:
        overrides = {"derandomize": False, "database": None, **overrides}
    machine = machine_class(name, candidate_cls, machine,
                            class_name="Stage2Machine_compare" if same_programs else None)
    machine.last_failure = None
    machine.totals.clear()
    machine.event_programs.clear()
    # hypothesis.seed() on the machine class is what @seed does for stateful tests
    machine._hypothesis_internal_use_seed = seed
    start = time.perf_counter()
    try:
        run_state_machine_as_test(machine, settings=Settings(base, **overrides))
    except ConformanceFailure as exc:
        found = machine.last_failure or (exc, [], None)
        failure, trace, m = polish.after_failure(name, candidate_cls, found)
        status = "error" if isinstance(failure, CandidateError) else "fail"
        counters = dict(m.platform.counters) if m is not None and m.platform else {}
        return RunResult(name, status, time.perf_counter() - start, failure, trace, counters,
                         calls=list(getattr(m, "calls", ())),
                         examples=machine.totals["examples"])
    totals = dict(machine.totals)
    return RunResult(name, "pass", time.perf_counter() - start,
                     counters={k: v for k, v in totals.items() if k not in ("examples", "steps")},
                     examples=totals.get("examples", 0), total_steps=totals.get("steps", 0),
                     events=dict(machine.event_programs))
