"""``stage2-conformance run``: one conformance run of one candidate."""

from __future__ import annotations

import argparse
import sys

from conformance import registry
from conformance.cli.common import (
    PROG, add_shared_db, finding_lines, maybe_progress, positive, timed_run)

def command(args: argparse.Namespace) -> int:
    from hypothesis import settings as Settings

    from conformance import profiles
    from conformance.failures import files, report

    try:
        cls = registry.load(args.candidate)
    except registry.UnknownCandidate as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except registry.CandidateImportError as exc:
        print(f"{PROG}: [candidate-error: import] {exc}", file=sys.stderr)
        path = files.write_import_error(args.candidate, exc)
        if path is not None:
            print(f"replay: {PROG} replay {files.display(path)}")
        return 2

    base = profiles.PROFILES[args.profile]
    overrides: dict = {}
    if args.examples is not None:
        overrides["max_examples"] = args.examples
    if args.shared_db:
        try:
            base, note = profiles.with_shared_db(base, args.shared_db)
        except profiles.SharedDatabaseError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
        overrides["database"] = base.database  # kept with --seed too
        if note:
            print(f"note: {note}")
    effective = Settings(base, **overrides)

    if args.machine == "parallel" and not getattr(
            getattr(cls, "capabilities", None), "concurrent", False):
        print(f"{PROG}: candidate {args.candidate!r} does not declare "
              "Capabilities(concurrent=True); the parallel machine needs it", file=sys.stderr)
        return 2
    budget = (f"{args.machine} machine, profile {args.profile}, up to "
              f"{effective.max_examples} examples of "
              f"up to {effective.stateful_step_count} steps"
              + (f", seed {args.seed}" if args.seed is not None else "")
              + (", shared database" if args.shared_db else ""))
    mark = files.current_seq()
    with maybe_progress(args.candidate, f"{args.candidate} ({budget})"):
        result, first = timed_run(args.candidate, cls, settings=base, seed=args.seed,
                                  machine=args.machine, **overrides)

    if result.status == "pass":
        rate = result.total_steps / result.seconds if result.seconds else 0.0
        print(f"PASS {args.candidate} ({budget}) in {result.seconds:.2f} s: "
              f"{result.examples} programs, {result.total_steps} steps "
              f"({rate:,.0f} steps/s)")
        for line in finding_lines(result.counters):
            print(line)
        return 0
    label = "FAIL" if result.status == "fail" else "ERROR"
    when = (f"; first failure after {first['examples']} programs, {first['seconds']:.2f} s"
            if first else "")
    print(f"{label} {args.candidate} ({budget}) after {result.seconds:.2f} s{when}")
    written = files.written_since(mark)
    rep = files.last_report(written[-1][0]) if written else None
    if rep is not None:
        report.show(rep)
    else:  # the failure files could not be written: the bare failure
        print(f"  {result.failure}")
        if result.trace:
            print(f"counterexample ({result.steps} step(s)):")
            for step in result.trace:
                print(f"  {step}")
    return 1 if result.status == "fail" else 2


def add_parser(sub) -> None:
    from conformance import profiles

    p = sub.add_parser(
        "run", help="run the conformance machine against one candidate",
        description="Run the sequential conformance machine (or, with --machine "
                    "parallel, the parallel one) against one registered "
                    "candidate. On failure, print the report (the violated property, "
                    "the numbered steps with expected vs observed, the stage-2 tables "
                    "and TLBs at the failing step, the cost counters) and the paths of "
                    "the replay file and the Markdown report. Exit 0 on pass, 1 on a "
                    "property violation, 2 on a candidate error or an unknown "
                    "candidate.")
    p.add_argument("--candidate", required=True, metavar="NAME",
                   help=f"registered candidate name (see `{PROG} list`)")
    p.add_argument("--profile", default="dev", choices=sorted(profiles.PROFILES),
                   help="Hypothesis settings profile (default: %(default)s)")
    p.add_argument("--machine", default="sequential", choices=("sequential", "parallel"),
                   help="the sequential machine, or the parallel one (steps of 2-4 "
                        "concurrent operations; needs Capabilities(concurrent=True)) "
                        "(default: %(default)s)")
    p.add_argument("--examples", type=positive, metavar="N",
                   help="max_examples override (default: the profile's)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="random seed (turns derandomization and the example "
                        "database off so the run is reproducible, unless --shared-db)")
    add_shared_db(p)
    p.set_defaults(func=command)
