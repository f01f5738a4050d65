"""Steps per second of the conformance machine against a bare Hypothesis state
machine of the same shape (same rules and argument strategies, empty bodies),
measured in one run and reported as a ratio (DESIGN §9).

    python benchmarks/steps_per_second.py [--examples N] [--candidate NAME]
"""

from __future__ import annotations

import argparse
import time

from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from conformance import profiles
from conformance.machines.sequential import Stage2Machine, machine_for
from conformance.registry import load


def bare_machine():
    """Rules and strategies shaped like Stage2Machine's, doing nothing."""
    body = {}
    for name in dir(Stage2Machine):
        fn = getattr(Stage2Machine, name)
        r = getattr(fn, "hypothesis_stateful_rule", None)
        if r is None:
            continue
        body[name] = rule(**r.arguments)(lambda self, **kw: setattr(self, "steps", self.steps + 1))
    body["__init__"] = lambda self: (RuleBasedStateMachine.__init__(self), setattr(self, "steps", 0))[0]
    body["boot"] = initialize()(lambda self: None)
    return type("BareMachine", (RuleBasedStateMachine,), body)


def measure(machine, examples: int) -> tuple[float, int]:
    steps = [0]
    original = machine.teardown

    def teardown(self):
        steps[0] += self.steps
        original(self)

    machine.teardown = teardown
    s = settings(profiles.PROFILES["ci"], max_examples=examples)
    start = time.perf_counter()
    run_state_machine_as_test(machine, settings=s)
    return time.perf_counter() - start, steps[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--candidate", default="reference")
    args = ap.parse_args()
    t_bare, n_bare = measure(bare_machine(), args.examples)
    t_real, n_real = measure(machine_for(args.candidate, load(args.candidate)), args.examples)
    bare, real = n_bare / t_bare, n_real / t_real
    print(f"bare machine:          {n_bare:6d} steps in {t_bare:6.2f}s = {bare:8.0f} steps/s")
    print(f"{args.candidate + ' machine:':22s} {n_real:6d} steps in {t_real:6.2f}s = {real:8.0f} steps/s")
    print(f"ratio (conformance / bare): {real / bare:.2f}")


if __name__ == "__main__":
    main()
