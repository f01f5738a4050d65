"""How fast the parallel machine catches each concurrency mutant: over a few
seeds, at which program the first failure came, how long that took, and how
long until the shrunk counterexample was written (what a user waits for).

    python benchmarks/time_to_catch.py [--seeds 5] [--examples 60] [NAME ...]

Each run is the ``ci`` budget (60 programs) with a random stream: ``--seeds``
seeds 0..N-1, not derandomized (the derandomized ``ci`` stream is one sample;
``tests/test_mutants.py`` checks that one). Times are wall-clock on this
machine: compare them with each other, not across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

from candidates.mutants import concurrency_mutants as cm
from conformance.failures import files
from conformance.machines.parallel import ParallelMachine
from conformance.runner import run

#: Every concurrency mutant, registered or not (a name may be any of them).
KNOWN = {**cm.MUTANTS, **cm.OUT_OF_BUDGET, **cm.NOT_OBSERVABLE}


def catch(name: str, cls: type, seed: int, examples: int) -> dict:
    """One run: ``first`` (seconds to the first failing program), ``program``
    (its number), ``total`` (seconds to the shrunk counterexample), the
    property and the shrunk length."""
    programs, first = [0], []
    original = ParallelMachine._boot

    def counting_boot(self, config, layout):
        programs[0] += 1
        return original(self, config, layout)

    start = time.perf_counter()

    def listener(machine, failure, path):
        if not first:
            first.append((time.perf_counter() - start, programs[0]))

    ParallelMachine._boot = counting_boot
    files.listeners.append(listener)
    try:
        result = run(name, cls, machine="parallel", profile="ci", seed=seed,
                     max_examples=examples)
    finally:
        files.listeners.remove(listener)
        ParallelMachine._boot = original
    total = time.perf_counter() - start
    seconds, program = first[0] if first else (None, None)
    return dict(status=result.status, first=seconds, program=program, total=total,
                prop=result.failed_property, steps=result.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("names", nargs="*", default=sorted(cm.MUTANTS))
    args = ap.parse_args()
    print(f"{'mutant':44} {'caught':>6} {'program (median)':>17} {'first s (median)':>17} "
          f"{'shrunk s (median)':>18}")
    for name in args.names:
        runs = [catch(name, KNOWN[name], seed, args.examples) for seed in range(args.seeds)]
        caught = [r for r in runs if r["status"] == "fail"]

        def med(key):
            values = [r[key] for r in caught]
            return f"{statistics.median(values):.1f}" if values else "-"

        print(f"{name:44} {len(caught):>3}/{len(runs):<2} {med('program'):>17} "
              f"{med('first'):>17} {med('total'):>18}", flush=True)
        for seed, r in enumerate(runs):
            if r["status"] != "fail":
                print(f"    seed {seed}: {r['status']}")


if __name__ == "__main__":
    main()
