"""Speed of the parallel machine, measured in one run: scheduling points and
parallel steps per second (time inside parallel steps only), and the whole
machine's steps per second against the sequential machine's on the same
candidate and budget, as a ratio (this machine is noisy; compare ratios).

    python benchmarks/parallel_steps.py [--examples N] [--candidate NAME]

The counts come from the cost counters of the parallel machine (``parallel
steps``, ``scheduling points``, ``scheduling decisions``, ``lock waits``), so
they are the ones the matrix shows.
"""

from __future__ import annotations

import argparse
import time

from conformance.machines.parallel import ParallelMachine
from conformance.registry import load
from conformance.runner import run


def timed_parallel_steps():
    """Wrap ``ParallelMachine._parallel_step`` to add up the time spent in it;
    returns the list holding the total and a function that undoes the wrap."""
    spent = [0.0]
    original = ParallelMachine._parallel_step

    def wrapped(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    ParallelMachine._parallel_step = wrapped
    return spent, lambda: setattr(ParallelMachine, "_parallel_step", original)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--candidate", default="kvm-classic")
    args = ap.parse_args()
    cls = load(args.candidate)
    sequential = run(args.candidate, cls, profile="ci", max_examples=args.examples)
    spent, undo = timed_parallel_steps()
    try:
        parallel = run(args.candidate, cls, profile="ci", machine="parallel",
                       max_examples=args.examples)
    finally:
        undo()
    for r in (sequential, parallel):
        if r.status != "pass":
            raise SystemExit(f"{r.candidate} did not pass: {r.failure}")
    c = parallel.counters
    steps, points = c["parallel steps"], c["scheduling points"]
    seq_rate = sequential.total_steps / sequential.seconds
    par_rate = parallel.total_steps / parallel.seconds
    print(f"candidate {args.candidate}, profile ci, {args.examples} programs per machine")
    print(f"sequential machine: {sequential.total_steps:6d} steps in {sequential.seconds:6.2f}s"
          f" = {seq_rate:7.0f} steps/s")
    print(f"parallel machine:   {parallel.total_steps:6d} steps in {parallel.seconds:6.2f}s"
          f" = {par_rate:7.0f} steps/s  (ratio parallel / sequential: "
          f"{par_rate / seq_rate:.2f})")
    print(f"  parallel steps:   {steps:6d} in {spent[0]:6.2f}s = {steps / spent[0]:7.0f} /s"
          f"  ({spent[0] / parallel.seconds:.0%} of the run)")
    print(f"  scheduling points {points:6d} = {points / spent[0]:7.0f} /s"
          f"  ({points / steps:.1f} per parallel step; {c['scheduling decisions']} decisions,"
          f" {c['lock waits']} lock waits, {c['preemptions fired']} preemptions fired)")


if __name__ == "__main__":
    main()
