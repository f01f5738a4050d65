"""``stage2-conformance mutants``: how fast every known-bug candidate is caught."""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from conformance import registry
from conformance.cli.common import (
    PROG, default_candidates, fmt, markdown_table, median, positive, print_table,
    stdout_is_terminal, timed_run, write_out)

def mutant_row(name: str, seeds: int, profile: str, examples: int) -> dict:
    """Run mutant ``name`` once per seed ``0 .. seeds-1`` and summarise."""
    row = {"name": name, "machine": "sequential", "bug": None, "expected_property": [],
           "caught": False,
           "caught_runs": 0, "runs": seeds, "property": None, "expected": None,
           "examples": None, "seconds": None, "generation_seconds": None,
           "shrink_seconds": None, "steps": None, "profile": profile,
           "max_examples": examples, "per_seed": []}
    try:
        cls = registry.load(name)
    except (registry.UnknownCandidate, registry.CandidateImportError) as exc:
        row.update(property="candidate-error", per_seed=[{"error": str(exc)}])
        return row
    row["bug"] = getattr(cls, "bug", None)
    row["machine"] = getattr(cls, "machine", "sequential")
    expected = getattr(cls, "expected_property", None) or ()
    row["expected_property"] = [expected] if isinstance(expected, str) else list(expected)
    runs = []
    for seed in range(seeds):
        result, first = timed_run(name, cls, profile=profile, seed=seed,
                                  max_examples=examples, machine=row["machine"])
        caught = result.status == "fail"
        runs.append({
            "seed": seed, "status": result.status, "caught": caught,
            "property": result.failed_property,
            "examples": first["examples"] if first else None,
            "seconds": round(result.seconds, 3),
            "generation_seconds": round(first["seconds"], 3) if first else None,
            "shrink_seconds": round(result.seconds - first["seconds"], 3) if first else None,
            "steps": result.steps if result.status != "pass" else None,
            "failure": None if result.failure is None else str(result.failure)})
    row["per_seed"] = runs
    caught = [r for r in runs if r["caught"]]
    props = [r["property"] for r in runs if r["property"]]
    row["caught_runs"] = len(caught)
    row["caught"] = len(caught) == seeds
    if props:
        row["property"] = statistics.mode(props)
        row["expected"] = (row["property"] in row["expected_property"]
                           if row["expected_property"] else None)
    for key in ("examples", "seconds", "generation_seconds", "shrink_seconds", "steps"):
        row[key] = median([r[key] for r in caught])
    return row



def _mutant_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["mutant", "caught", "property", "expected", "programs", "s to 1st fail",
              "shrink s", "total s", "shrunk steps"]
    body = []
    for r in rows:
        caught = "caught" if r["caught"] else "NOT caught"
        caught += f" {r['caught_runs']}/{r['runs']}"
        expected = "-" if r["expected"] is None else ("yes" if r["expected"] else "NO")
        body.append([r["name"], caught, r["property"] or "-", expected,
                     fmt(r["examples"], 1), fmt(r["generation_seconds"]),
                     fmt(r["shrink_seconds"]), fmt(r["seconds"]), fmt(r["steps"], 1)])
    return header, body


def mutants_markdown(rows: list[dict]) -> str:
    lines = markdown_table(*_mutant_cells(rows), left=4)
    if rows:
        r = rows[0]
        lines += ["", f"Medians over {r['runs']} seeded runs (seeds 0–{r['runs'] - 1}) of "
                  f"profile `{r['profile']}` with up to {r['max_examples']} programs; "
                  "programs and seconds are to the first failure (that program "
                  "included), shrink time is the rest of the run, shrunk steps exclude "
                  "boot and teardown."]
    return "\n".join(lines) + "\n"


def command(args: argparse.Namespace) -> int:
    names = args.candidate or default_candidates(known_bug=True)
    unknown = [n for n in names if n not in registry.available()]
    if unknown:
        print(f"{PROG}: {registry.UnknownCandidate(unknown[0], list(registry.available()))}",
              file=sys.stderr)
        return 2
    status = None
    if stdout_is_terminal():
        from rich.console import Console

        status = Console(file=sys.stdout).status("mutants")
        status.start()
    rows = []
    try:
        for i, name in enumerate(names):
            if status is not None:
                status.update(f"mutants: {name} ({i + 1}/{len(names)}), "
                              f"{args.seeds} seeds")
            rows.append(mutant_row(name, args.seeds, args.profile, args.examples))
    finally:
        if status is not None:
            status.stop()
    if "-" not in (args.json, args.markdown):  # standard output is the file
        header, body = _mutant_cells(rows)
        print_table("stage2-conformance mutants (medians over seeds)", header, body,
                     right_from=4)
    if args.json:
        write_out(args.json, json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        write_out(args.markdown, mutants_markdown(rows))
    return 0 if all(r["caught"] for r in rows) else 1


def add_parser(sub) -> None:
    from conformance import profiles

    p = sub.add_parser(
        "mutants", help="how fast every known-bug candidate is caught",
        description="Run every known-bug candidate (or those given with --candidate) "
                    "once per seed and report, as medians over the seeds: the property "
                    "that caught it, programs and seconds to the first failure, the "
                    "shrink time, the total time and the shrunk length. Exit 0 if "
                    "every mutant was caught in every run, else 1.")
    p.add_argument("--candidate", action="append", metavar="NAME",
                   help="restrict to this candidate (repeatable; default: every "
                        "known-bug candidate)")
    p.add_argument("--seeds", type=positive, default=5, metavar="N",
                   help="seeded runs per mutant, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--examples", type=positive, default=300, metavar="N",
                   help="max_examples per run (default: %(default)s: a cap high "
                        "enough to show the slow tail; tests/test_mutants.py holds "
                        "every mutant to the ci profile's 60)")
    p.add_argument("--profile", default="dev", choices=sorted(profiles.PROFILES),
                   help="Hypothesis settings profile, run seeded and without the "
                        "database (default: %(default)s)")
    p.add_argument("--json", metavar="FILE",
                   help="write a JSON list of objects (name, caught, caught_runs, "
                        "property, expected, examples, seconds, generation_seconds, "
                        "shrink_seconds, steps, per_seed, ...); - for standard output")
    p.add_argument("--markdown", metavar="FILE",
                   help="write the table as Markdown; - for standard output")
    p.set_defaults(func=command)
