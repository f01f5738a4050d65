"""Step deletion after Hypothesis's shrink (DESIGN §7: short counterexamples).

Hypothesis's shrinker deletes runs of at most five choices at a time. One
step of a conformance program is 4 to 8 choices (the "go on" flag, the rule,
swarm-testing flags written on every rule choice, the arguments), so a step in
the middle of a program can survive shrinking even though the program fails
the same way without it; for example two redundant ``caches on`` steps before
the write that shows a missing dirty mark. This pass finishes the job on the
rule level: it replays the shrunk program without each step in turn (last
first, ``boot`` never) and keeps every deletion after which the program still
fails with the same failure (the same exception class, property family and,
for candidate errors, kind), until no single step can go. The result is
1-minimal: removing any one remaining step makes the failure go away or
change.

Each attempt is one replay without Hypothesis (no files written), so the pass
costs a few replays of a program Hypothesis has already made short. A
candidate that timed out is left alone: each replay would wait out the
timeout again.

On the parallel machine the pass then simplifies inside each remaining
parallel step: it drops a preemption, drops an operation, or moves a
preemption to the first point of its kind, keeping each change after which
the program fails the same way.
"""

from __future__ import annotations

import attrs

from conformance.errors import ConformanceFailure
from conformance.failures import files
from conformance.machines.parallel import PARALLEL_RULES, machine_class

#: Replays the pass may spend; a shrunk program is short, so this is rarely hit.
MAX_ATTEMPTS = 60


@attrs.frozen
class Polished:
    """The program after step deletion and the failure it gives."""

    calls: tuple          # (rule, kwargs) pairs, boot first
    failure: ConformanceFailure
    machine: object       # the machine at the failure, for the report
    deleted: int          # steps removed from the program Hypothesis shrank to


def same_failure(a: ConformanceFailure, b: ConformanceFailure) -> bool:
    """The equivalence the pass keeps: what the report's headline shows."""
    return (type(a) is type(b) and a.property == b.property
            and getattr(a, "kind", None) == getattr(b, "kind", None))


def play(name: str, cls: type, calls,
         machine: str = "sequential") -> tuple[ConformanceFailure | None, object]:
    """Run ``calls`` (boot first) and teardown against ``cls`` without
    Hypothesis and without writing files; the failure (or ``None``) and the
    machine."""
    m = machine_class(name, cls, machine)()
    with files.not_writing():
        try:
            for rule, kwargs in calls:
                getattr(m, rule)(**kwargs)
            m.teardown()
        except ConformanceFailure as exc:
            return exc, m
    return None, m


def delete_steps(name: str, cls: type, calls, failure: ConformanceFailure,
                 max_attempts: int = MAX_ATTEMPTS,
                 machine: str = "sequential") -> Polished | None:
    """Delete every step of ``calls`` that the failure does not need (see the
    module docstring). ``None`` when no step could be deleted."""
    best = tuple(calls)
    best_failure, best_machine = failure, None
    attempts, changed = 0, True
    while changed and attempts < max_attempts:
        changed = False
        i = len(best) - 1
        while i >= 1 and attempts < max_attempts:  # calls[0] is boot
            trial = best[:i] + best[i + 1:]
            attempts += 1
            got, played = play(name, cls, trial, machine)
            if got is not None and same_failure(got, failure):
                best, best_failure, best_machine, changed = trial, got, played, True
            i -= 1
    changed = machine == "parallel"
    while changed and attempts < max_attempts:
        changed = False
        for trial in _inside_parallel_steps(best):
            if attempts >= max_attempts:
                break
            attempts += 1
            got, played = play(name, cls, trial, machine)
            if got is not None and same_failure(got, failure):
                best, best_failure, best_machine, changed = trial, got, played, True
                break  # the next simplifications start from this program
    if best_machine is None:
        return None
    return Polished(best, best_failure, best_machine, len(calls) - len(best))


def _inside_parallel_steps(calls):
    """Simpler versions of ``calls``, one change inside one parallel step at
    a time: without a preemption, without an operation, with a preemption's
    ``after`` at 1 (the caller starts again from each change it keeps)."""
    i = len(calls) - 1
    while i >= 1:
        rule, args = calls[i]
        if rule in PARALLEL_RULES:
            for simpler in _simpler_steps(args):
                yield calls[:i] + ((rule, simpler),) + calls[i + 1:]
        i -= 1


def _simpler_steps(args):
    schedule, ops = args["schedule"], tuple(args["ops"])
    preemptions = schedule.preemptions
    for k in range(len(preemptions) - 1, -1, -1):
        yield {**args, "schedule": attrs.evolve(
            schedule, preemptions=preemptions[:k] + preemptions[k + 1:])}
    for k in range(len(ops) - 1, -1, -1):
        if len(ops) > 1:
            yield {**args, "ops": ops[:k] + ops[k + 1:]}
    for k, p in enumerate(preemptions):
        if p.after > 1:
            yield {**args, "schedule": attrs.evolve(schedule, preemptions=(
                preemptions[:k] + (attrs.evolve(p, after=1),) + preemptions[k + 1:]))}


def after_failure(name: str, cls: type, found):
    """Given a machine class's ``last_failure`` (failure, trace, machine) after
    Hypothesis's shrink, delete what steps it can, rewrite the failure files
    for the shorter program and return its (failure, trace, machine)."""
    failure, trace, machine = found
    if machine is None or not getattr(machine, "calls", None):
        return found
    if getattr(failure, "kind", None) == "timeout":
        return found  # every replay would wait out the timeout again
    try:
        polished = delete_steps(name, cls, machine.calls, failure,
                                machine=getattr(machine, "kind", "sequential"))
    except Exception as exc:  # noqa: BLE001 - never turn a found failure into a crash
        import sys
        print(f"stage2-conformance: step deletion skipped: {exc!r}", file=sys.stderr)
        return found
    if polished is None:
        return found
    files.write_failure(polished.machine, polished.failure,
                         settings=getattr(machine, "run_settings", None),
                         deleted_steps=polished.deleted)
    return polished.failure, list(polished.machine.trace), polished.machine
