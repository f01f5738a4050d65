"""The ``stage2-conformance`` command line (DESIGN §7, §8).

Subcommands (each has ``--help``):

``list``     the registered candidates (entry-point group
             ``stage2_conformance.candidates``): name, kind, capabilities,
             version and entry point; ``--json`` for a machine-readable list. A
             candidate that fails to import is listed with its error.
``run``      one conformance run of one candidate outside pytest
             (:func:`conformance.runner.run`), with a progress line on a
             terminal, the failure report and the paths of the failure files.
``matrix``   candidates × machines: status, programs, steps/s and the cost
             counters, every candidate running the same programs.
``mutants``  every known-bug candidate over several seeds: which property
             caught it, programs and seconds to the first failure, shrink time,
             shrunk length (medians).
``replay``   re-run a replay file without Hypothesis and print its report.
``explain``  what a property family checks, with its reference invariants.

Exit codes: 0 pass (``mutants``: every mutant caught), 1 a property violation
(``matrix``: any candidate did not pass; ``mutants``: one was not caught), 2 a
candidate error (it raised, returned the wrong type, did not return, failed
to import), an unknown candidate or property, or a usage error.

One module per subcommand (``listing``, ``run``, ``matrix``, ``mutants``,
``replay``, ``explain``), each with ``add_parser(subparsers)``, which sets
``func`` on its parser to the module's ``command(args)``; register a new one in
:data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from conformance.cli import explain, listing, matrix, mutants, replay, run
from conformance.cli.common import PROG

#: Subcommand name -> function adding its parser (keep in display order).
COMMANDS: dict[str, Callable] = {"list": listing.add_parser, "run": run.add_parser,
                                 "matrix": matrix.add_parser, "mutants": mutants.add_parser,
                                 "replay": replay.add_parser, "explain": explain.add_parser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Property-based conformance suite for KVM/arm64-style stage-2 "
                    "page-table management.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and
    return the exit code (argparse usage errors and ``--help`` included,
    without raising ``SystemExit``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
