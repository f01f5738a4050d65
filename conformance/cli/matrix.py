"""``stage2-conformance matrix``: candidates × machines, on the same programs."""

from __future__ import annotations

import argparse
import json
import sys

from conformance import registry
from conformance.cli.common import (
    PROG, default_candidates, markdown_table, positive, print_table, stdout_is_terminal,
    timed_run, write_out)

#: The machines a candidate can be run against; ``parallel`` only for
#: candidates that declare ``Capabilities(concurrent=True)``.
MACHINES = ("sequential", "parallel")

#: (column, counter key or prefix) of the cost counters shown in tables; a
#: key ending in ":" sums every counter with that prefix. TLBI kinds get one
#: column each (added per table).
COUNTER_COLUMNS = [
    ("faults", "faults:"),
    ("faults after log off", "faults after dirty-log disable"),
    ("refaults", "refaults"),
    ("notifier-unmapped pages", "pages unmapped by notifiers"),
    ("CMO bytes", "bytes cleaned+invalidated"),
    ("I-cache inv", "icache invalidations"),
    ("table pages", "table pages allocated"),
    ("GUP", "gup"),
    ("hw AF", "hw AF updates"),
    ("split-dropped pages", "pages dropped by a block split without CMO"),
    ("known findings", "known finding:"),
    ("RCU callbacks", "rcu callbacks"),
    ("parallel steps", "parallel steps"),
    ("sched points", "scheduling points"),
    ("lock waits", "lock waits"),
    ("spins", "cpu_relax spins"),
]


def _counter_columns(rows: list[dict]) -> list[tuple[str, str]]:
    kinds = sorted({k for r in rows for k in (r.get("counters") or {})
                    if k.startswith("tlbi: ")})
    cols = COUNTER_COLUMNS[:1] + [(k.replace("tlbi: ", "TLBI "), k) for k in kinds] \
        + COUNTER_COLUMNS[1:]
    return cols


def _counter_value(counters: dict, key: str) -> int:
    if key.endswith(":"):
        return sum(v for k, v in counters.items() if k.startswith(key))
    return counters.get(key, 0)


def matrix_rows(names: list[str], profile: str, examples: int | None,
                seed: int | None, progress=None) -> list[dict]:
    """One row per candidate × machine: the run of :func:`runner.run` with
    ``same_programs=True`` and no example database."""
    from conformance import profiles

    base = profiles.PROFILES[profile]
    if seed is None and not base.derandomize:
        seed = 0  # otherwise every candidate would get different random programs
    overrides = {"database": None}
    if examples is not None:
        overrides["max_examples"] = examples
    effective_examples = examples or base.max_examples
    rows = []
    for i, name in enumerate(names):
        if progress is not None:
            progress(f"{name} ({i + 1}/{len(names)})")
        for machine in MACHINES:
            row = {"candidate": name, "machine": machine, "status": None, "examples": 0,
                   "steps": 0, "seconds": 0.0, "steps_per_second": None, "counters": {},
                   "property": None, "failure": None, "profile": profile, "seed": seed,
                   "max_examples": effective_examples,
                   "stateful_step_count": base.stateful_step_count}
            try:
                cls = registry.load(name)
            except (registry.UnknownCandidate, registry.CandidateImportError) as exc:
                if machine == "sequential":
                    row.update(status="error", property="candidate-error", failure=str(exc))
                    rows.append(row)
                continue
            if machine == "parallel" and not getattr(
                    getattr(cls, "capabilities", None), "concurrent", False):
                continue
            result, first = timed_run(name, cls, profile=profile, seed=seed,
                                      same_programs=True, machine=machine, **overrides)
            row.update(status=result.status, seconds=round(result.seconds, 3),
                       counters=dict(sorted(result.counters.items())))
            if result.status == "pass":
                row.update(examples=result.examples, steps=result.total_steps,
                           steps_per_second=round(result.total_steps / result.seconds, 1)
                           if result.seconds else None)
            else:
                row.update(examples=first["examples"] if first else None,
                           steps=result.steps, property=result.failed_property,
                           failure=str(result.failure))
            rows.append(row)
    return rows


def _matrix_table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = _counter_columns(rows)
    header = ["candidate", "machine", "status", "programs", "steps", "steps/s"] + \
        [c for c, _k in cols]
    body = []
    for r in rows:
        status = r["status"] if r["status"] == "pass" else f"{r['status']}: {r['property']}"
        rate = "-" if r["steps_per_second"] is None else f"{r['steps_per_second']:,.0f}"
        counters = r.get("counters") or {}
        body.append([r["candidate"], r["machine"], status,
                     "-" if r["examples"] is None else str(r["examples"]), str(r["steps"]),
                     rate] + [str(_counter_value(counters, k)) for _c, k in cols])
    return header, body


def matrix_markdown(rows: list[dict]) -> str:
    lines = markdown_table(*_matrix_table_cells(rows), left=3)
    if rows:
        r = rows[0]
        how = (f"profile `{r['profile']}`" + (f", seed {r['seed']}" if r["seed"] is not None
                                             else ", derandomized")
               + f", up to {r['max_examples']} programs of up to {r['stateful_step_count']} "
               "steps, the same programs for every candidate; counters summed over "
               "all programs of a passing run (for a failing one: its failing program)")
        lines += ["", how]
    return "\n".join(lines) + "\n"


def command(args: argparse.Namespace) -> int:
    names = args.candidate or default_candidates(known_bug=False)
    if args.candidate:
        unknown = [n for n in names if n not in registry.available()]
        if unknown:
            print(f"{PROG}: {registry.UnknownCandidate(unknown[0], list(registry.available()))}",
                  file=sys.stderr)
            return 2
    progress = None
    status = None
    if stdout_is_terminal():
        from rich.console import Console

        status = Console(file=sys.stdout).status("matrix")
        status.start()
        progress = lambda text: status.update(f"matrix: running {text}")  # noqa: E731
    try:
        rows = matrix_rows(names, args.profile, args.examples, args.seed, progress)
    finally:
        if status is not None:
            status.stop()
    if "-" not in (args.json, args.markdown):  # standard output is the file
        header, body = _matrix_table_cells(rows)
        print_table("stage2-conformance matrix (candidates × machines)", header, body)
        if rows:
            print(matrix_markdown(rows).rsplit("\n\n", 1)[-1].strip())
    if args.json:
        write_out(args.json, json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        write_out(args.markdown, matrix_markdown(rows))
    return 0 if all(r["status"] == "pass" for r in rows) else 1


def add_parser(sub) -> None:
    from conformance import profiles

    p = sub.add_parser(
        "matrix", help="candidates × machines: status, programs, steps/s, cost counters",
        description="Run every correct (non-known-bug) registered candidate, or those "
                    "given with --candidate, against every machine (sequential; and "
                    "parallel for candidates that declare concurrent=True), all on the "
                    "same programs (derandomized, or seeded "
                    "with a random profile) without the example database, and print "
                    "status, programs, steps, steps/s and the cost counters (faults, "
                    "TLBIs by kind, cache maintenance bytes, I-cache invalidations, "
                    "table pages, GUP calls). Exit 0 if every run passed, else 1.")
    p.add_argument("--candidate", action="append", metavar="NAME",
                   help="restrict to this candidate (repeatable; default: every "
                        "correct candidate)")
    p.add_argument("--profile", default="ci", choices=sorted(profiles.PROFILES),
                   help="Hypothesis settings profile (default: %(default)s)")
    p.add_argument("--examples", type=positive, metavar="N",
                   help="max_examples override (default: the profile's)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="random seed (default: derandomized with ci; 0 with a random "
                        "profile, so every candidate gets the same programs)")
    p.add_argument("--json", metavar="FILE",
                   help="write the rows as a JSON list of objects (candidate, machine, "
                        "status, examples, steps, seconds, steps_per_second, counters, "
                        "property, failure, ...); - for standard output")
    p.add_argument("--markdown", metavar="FILE",
                   help="write the table as Markdown (for the README); - for standard "
                        "output")
    p.set_defaults(func=command)
