"""The ``stage2-conformance`` command line (DESIGN §8).

Subcommands (each has ``--help``):

``list``  the registered candidates (entry-point group
          ``stage2_conformance.candidates``): name, kind, capabilities, version
          and entry point; ``--json`` for a machine-readable list. A candidate
          that fails to import is listed with its error.
``run``   one conformance run of one candidate outside pytest
          (:func:`conformance.runner.run`).

Exit codes of ``run``: 0 the candidate passed, 1 it violated a property,
2 a candidate error (it raised, returned the wrong type, failed to import) or
an unknown candidate. Usage errors exit 2 as usual with argparse.

Subcommands are registered in :data:`COMMANDS`; add one by writing a
``_add_<name>(subparsers)`` function that sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from conformance import registry

PROG = "stage2-conformance"


# --------------------------------------------------------------------- list
def candidate_rows() -> list[dict]:
    """One dict per registered candidate: name, kind ("correct", "known
    bug", or "error" if it does not load), capabilities, version,
    entry_point and error (None, or the one-line import error)."""
    rows = []
    for name, ep in registry.available().items():
        row = {"name": name, "kind": None, "capabilities": None, "version": None,
               "entry_point": ep.value, "error": None}
        try:
            cls = registry.load_entry_point(ep)
        except registry.CandidateImportError as exc:
            row["kind"] = "error"
            row["error"] = str(exc)
        else:
            caps = getattr(cls, "capabilities", None)
            row["kind"] = "known bug" if registry.is_known_bug(cls) else "correct"
            row["capabilities"] = caps.describe() if hasattr(caps, "describe") else None
            row["version"] = str(getattr(cls, "version", "")) or None
        rows.append(row)
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    rows = candidate_rows()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # plain text, and never wrap a name across lines
        console = Console(width=max(console.width, 400), no_color=True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("name", "kind", "capabilities", "version", "entry point"):
        table.add_column(column, no_wrap=column in ("name", "kind", "version"))
    for row in rows:
        if row["error"]:
            reason = row["error"].split(") ", 1)[-1]
            table.add_row(row["name"], "[red]error[/red]", f"[red]{_escape(reason)}[/red]",
                          "-", row["entry_point"])
            continue
        kind = row["kind"] if row["kind"] == "correct" else f"[yellow]{row['kind']}[/yellow]"
        table.add_row(row["name"], kind, _escape(row["capabilities"] or "-"),
                      row["version"] or "-", row["entry_point"])
    if rows:
        console.print(table)
        console.print(f"{len(rows)} candidate(s); run one with: "
                      f"{PROG} run --candidate NAME", highlight=False)
    else:
        console.print(f"no candidates registered under {registry.GROUP!r}", highlight=False)
    return 0


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the registered candidates",
                       description="List the candidates registered under the entry-point "
                                   f"group {registry.GROUP!r}.")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {name, kind, capabilities, version, "
                        "entry_point, error}")
    p.set_defaults(func=_cmd_list)


# ---------------------------------------------------------------------- run
def _cmd_run(args: argparse.Namespace) -> int:
    from hypothesis import core
    from hypothesis import settings as Settings

    from conformance import profiles, runner

    try:
        cls = registry.load(args.candidate)
    except (registry.UnknownCandidate, registry.CandidateImportError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2

    overrides: dict = {}
    if args.examples is not None:
        overrides["max_examples"] = args.examples
    if args.seed is not None:
        # Hypothesis' own --hypothesis-seed mechanism; the database would
        # replay saved examples first, so it is off for a seeded run.
        overrides.update(derandomize=False, database=None)
    effective = Settings(profiles.PROFILES[args.profile], **overrides)

    saved_seed = core.global_force_seed
    if args.seed is not None:
        core.global_force_seed = args.seed
    try:
        result = runner.run(args.candidate, cls, profile=args.profile, **overrides)
    finally:
        core.global_force_seed = saved_seed

    budget = (f"profile {args.profile}, up to {effective.max_examples} examples of "
              f"up to {effective.stateful_step_count} steps"
              + (f", seed {args.seed}" if args.seed is not None else ""))
    if result.status == "pass":
        print(f"PASS {args.candidate} ({budget}) in {result.seconds:.2f} s")
        return 0
    label = "FAIL" if result.status == "fail" else "ERROR"
    print(f"{label} {args.candidate} ({budget}) after {result.seconds:.2f} s")
    print(f"  {result.failure}")
    if result.trace:
        print(f"counterexample ({result.steps} step(s)):")
        for step in result.trace:
            print(f"  {step}")
    return 1 if result.status == "fail" else 2


def _add_run(sub) -> None:
    from conformance import profiles

    p = sub.add_parser(
        "run", help="run the conformance machine against one candidate",
        description="Run the sequential conformance machine against one registered "
                    "candidate. Exit 0 on pass, 1 on a property violation, 2 on a "
                    "candidate error or an unknown candidate.")
    p.add_argument("--candidate", required=True, metavar="NAME",
                   help="registered candidate name (see `%(prog)s list`)".replace(
                       "%(prog)s", PROG))
    p.add_argument("--profile", default="dev", choices=sorted(profiles.PROFILES),
                   help="Hypothesis settings profile (default: %(default)s)")
    p.add_argument("--examples", type=_positive, metavar="N",
                   help="max_examples override (default: the profile's)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="random seed (turns derandomization and the example "
                        "database off so the run is reproducible)")
    p.set_defaults(func=_cmd_run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# --------------------------------------------------------------------- main
#: Subcommand name -> function adding its parser (keep in display order).
COMMANDS: dict[str, Callable] = {"list": _add_list, "run": _add_run}


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
