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

Subcommands are registered in :data:`COMMANDS`; add one by writing a
``_add_<name>(subparsers)`` function that sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
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


# ------------------------------------------------------------------ helpers
def _stdout_is_terminal() -> bool:
    from rich.console import Console

    return Console(file=sys.stdout).is_terminal


def _write_out(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (``-``: standard output)."""
    if path == "-":
        sys.stdout.write(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _live_totals(name: str):
    """The running machine class's totals for candidate ``name`` (passing
    programs and their steps so far), for progress displays."""
    from conformance.machine import Stage2Machine

    for cls in reversed(Stage2Machine.__subclasses__()):
        if getattr(cls, "candidate_name", None) == name:
            return cls.totals
    return {}


def timed_run(name: str, cls: type, **kwargs):
    """``runner.run(name, cls, **kwargs)`` that also measures the first
    failure: returns ``(result, first)`` where ``first`` is ``None`` or
    ``{"seconds", "examples"}`` — the time from the start to the end of the
    first failing program and the number of programs run until then (that
    one included). The rest of the run's time is shrinking."""
    from conformance import replay, runner

    first: dict = {}
    start = time.perf_counter()

    def listener(machine, failure, path):
        if not first and getattr(machine, "candidate_name", None) == name:
            first["seconds"] = time.perf_counter() - start
            first["examples"] = type(machine).totals.get("examples", 0) + 1

    replay.listeners.append(listener)
    try:
        result = runner.run(name, cls, **kwargs)
    finally:
        replay.listeners.remove(listener)
    return result, (first or None)


class _Progress:
    """A one-line live status on a terminal while a run goes: programs passed,
    steps, failing programs seen (shrinking) and the elapsed time."""

    def __init__(self, name: str, label: str):
        self.name, self.label = name, label
        self.failing = 0
        self.live = None

    def _count(self, machine, failure, path):
        if getattr(machine, "candidate_name", None) == self.name:
            self.failing += 1

    def _render(self):
        from rich.text import Text

        totals = _live_totals(self.name)
        elapsed = time.perf_counter() - self.start
        phase = (f"[yellow]shrinking[/yellow] ({self.failing} failing programs so far)"
                 if self.failing else "generating")
        self.spinner.update(text=Text.from_markup(
            f"{self.label}: {phase}; {totals.get('examples', 0)} programs passed, "
            f"{totals.get('steps', 0)} steps; {elapsed:.1f} s"))
        return self.spinner

    def __enter__(self):
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        from conformance import replay

        self.start = time.perf_counter()
        self.spinner = Spinner("dots")
        replay.listeners.append(self._count)
        self.live = Live(get_renderable=self._render, console=Console(file=sys.stdout),
                         transient=True, refresh_per_second=8)
        self.live.start()
        return self

    def __exit__(self, *exc):
        from conformance import replay

        self.live.stop()
        replay.listeners.remove(self._count)
        return False


def _maybe_progress(name: str, label: str):
    import contextlib

    return _Progress(name, label) if _stdout_is_terminal() else contextlib.nullcontext()


# ---------------------------------------------------------------------- run
def _cmd_run(args: argparse.Namespace) -> int:
    from hypothesis import settings as Settings

    from conformance import profiles, replay, report

    try:
        cls = registry.load(args.candidate)
    except registry.UnknownCandidate as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except registry.CandidateImportError as exc:
        print(f"{PROG}: [candidate-error: import] {exc}", file=sys.stderr)
        path = replay.write_import_error(args.candidate, exc)
        if path is not None:
            print(f"replay: {PROG} replay {replay._display(path)}")
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

    budget = (f"profile {args.profile}, up to {effective.max_examples} examples of "
              f"up to {effective.stateful_step_count} steps"
              + (f", seed {args.seed}" if args.seed is not None else "")
              + (", shared database" if args.shared_db else ""))
    mark = replay.current_seq()
    with _maybe_progress(args.candidate, f"{args.candidate} ({budget})"):
        result, first = timed_run(args.candidate, cls, settings=base, seed=args.seed,
                                  **overrides)

    if result.status == "pass":
        rate = result.total_steps / result.seconds if result.seconds else 0.0
        print(f"PASS {args.candidate} ({budget}) in {result.seconds:.2f} s: "
              f"{result.examples} programs, {result.total_steps} steps "
              f"({rate:,.0f} steps/s)")
        return 0
    label = "FAIL" if result.status == "fail" else "ERROR"
    when = (f"; first failure after {first['examples']} programs, {first['seconds']:.2f} s"
            if first else "")
    print(f"{label} {args.candidate} ({budget}) after {result.seconds:.2f} s{when}")
    files = [(j, m) for j, m in replay.written_since(mark)]
    rep = replay.last_report(files[-1][0]) if files else None
    if rep is not None:
        report.show(rep)
    else:  # the failure files could not be written: the bare failure
        print(f"  {result.failure}")
        if result.trace:
            print(f"counterexample ({result.steps} step(s)):")
            for step in result.trace:
                print(f"  {step}")
    return 1 if result.status == "fail" else 2


def _add_shared_db(p) -> None:
    p.add_argument("--shared-db", metavar="redis://HOST:PORT",
                   help="share the example database through Redis (with the local "
                        "directory database): failures found by any machine are "
                        "replayed first everywhere. A derandomized profile (ci) runs "
                        "non-derandomized with it. Needs the redis package.")


def _add_run(sub) -> None:
    from conformance import profiles

    p = sub.add_parser(
        "run", help="run the conformance machine against one candidate",
        description="Run the sequential conformance machine against one registered "
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
    p.add_argument("--examples", type=_positive, metavar="N",
                   help="max_examples override (default: the profile's)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="random seed (turns derandomization and the example "
                        "database off so the run is reproducible, unless --shared-db)")
    _add_shared_db(p)
    p.set_defaults(func=_cmd_run)


# ------------------------------------------------------------------- matrix
#: The machines a candidate can be run against (one for now).
MACHINES = ("sequential",)

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
                row.update(status="error", property="candidate-error", failure=str(exc))
                rows.append(row)
                continue
            result, first = timed_run(name, cls, profile=profile, seed=seed,
                                      same_programs=True, **overrides)
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
    header, body = _matrix_table_cells(rows)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    if rows:
        r = rows[0]
        how = (f"profile `{r['profile']}`" + (f", seed {r['seed']}" if r["seed"] is not None
                                             else ", derandomized")
               + f", up to {r['max_examples']} programs of up to {r['stateful_step_count']} "
               "steps, the same programs for every candidate; counters summed over "
               "all programs of a passing run (for a failing one: its failing program)")
        lines += ["", how]
    return "\n".join(lines) + "\n"


def _print_table(title: str, header: list[str], body: list[list[str]],
                 right_from: int = 3) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console = Console(file=sys.stdout, width=max(console.width, 400), no_color=True)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="right" if i >= right_from else "left",
                         no_wrap=i < 1)
    for row in body:
        cells = [escape(c) for c in row]
        for i, c in enumerate(row):
            if c.startswith(("fail", "error", "NOT")):
                cells[i] = f"[red]{escape(c)}[/red]"
            elif c in ("pass", "caught"):
                cells[i] = f"[green]{c}[/green]"
        table.add_row(*cells)
    console.print(table)


def _cmd_matrix(args: argparse.Namespace) -> int:
    names = args.candidate or _default_candidates(known_bug=False)
    if args.candidate:
        unknown = [n for n in names if n not in registry.available()]
        if unknown:
            print(f"{PROG}: {registry.UnknownCandidate(unknown[0], list(registry.available()))}",
                  file=sys.stderr)
            return 2
    progress = None
    status = None
    if _stdout_is_terminal():
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
        _print_table("stage2-conformance matrix (candidates × machines)", header, body)
        if rows:
            print(matrix_markdown(rows).rsplit("\n\n", 1)[-1].strip())
    if args.json:
        _write_out(args.json, json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        _write_out(args.markdown, matrix_markdown(rows))
    return 0 if all(r["status"] == "pass" for r in rows) else 1


def _default_candidates(known_bug: bool) -> list[str]:
    out = []
    for name, ep in registry.available().items():
        try:
            cls = registry.load_entry_point(ep)
        except registry.CandidateImportError:
            if not known_bug:
                out.append(name)  # shown as an error row
            continue
        if registry.is_known_bug(cls) == known_bug:
            out.append(name)
    return out


def _add_matrix(sub) -> None:
    from conformance import profiles

    p = sub.add_parser(
        "matrix", help="candidates × machines: status, programs, steps/s, cost counters",
        description="Run every correct (non-known-bug) registered candidate, or those "
                    "given with --candidate, against every machine (for now: "
                    "sequential), all on the same programs (derandomized, or seeded "
                    "with a random profile) without the example database, and print "
                    "status, programs, steps, steps/s and the cost counters (faults, "
                    "TLBIs by kind, cache maintenance bytes, I-cache invalidations, "
                    "table pages, GUP calls). Exit 0 if every run passed, else 1.")
    p.add_argument("--candidate", action="append", metavar="NAME",
                   help="restrict to this candidate (repeatable; default: every "
                        "correct candidate)")
    p.add_argument("--profile", default="ci", choices=sorted(profiles.PROFILES),
                   help="Hypothesis settings profile (default: %(default)s)")
    p.add_argument("--examples", type=_positive, metavar="N",
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
    p.set_defaults(func=_cmd_matrix)


# ------------------------------------------------------------------ mutants
def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def mutant_row(name: str, seeds: int, profile: str, examples: int) -> dict:
    """Run mutant ``name`` once per seed ``0 .. seeds-1`` and summarise."""
    row = {"name": name, "bug": None, "expected_property": [], "caught": False,
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
    expected = getattr(cls, "expected_property", None) or ()
    row["expected_property"] = [expected] if isinstance(expected, str) else list(expected)
    runs = []
    for seed in range(seeds):
        result, first = timed_run(name, cls, profile=profile, seed=seed,
                                  max_examples=examples)
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
        row[key] = _median([r[key] for r in caught])
    return row


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.{digits}f}"
    return str(int(value)) if isinstance(value, float) else str(value)


def _mutant_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["mutant", "caught", "property", "expected", "programs", "s to 1st fail",
              "shrink s", "total s", "shrunk steps"]
    body = []
    for r in rows:
        caught = "caught" if r["caught"] else "NOT caught"
        caught += f" {r['caught_runs']}/{r['runs']}"
        expected = "-" if r["expected"] is None else ("yes" if r["expected"] else "NO")
        body.append([r["name"], caught, r["property"] or "-", expected,
                     _fmt(r["examples"], 1), _fmt(r["generation_seconds"]),
                     _fmt(r["shrink_seconds"]), _fmt(r["seconds"]), _fmt(r["steps"], 1)])
    return header, body


def mutants_markdown(rows: list[dict]) -> str:
    header, body = _mutant_cells(rows)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    if rows:
        r = rows[0]
        lines += ["", f"Medians over {r['runs']} seeded runs (seeds 0–{r['runs'] - 1}) of "
                  f"profile `{r['profile']}` with up to {r['max_examples']} programs; "
                  "programs and seconds are to the first failure (that program "
                  "included), shrink time is the rest of the run, shrunk steps exclude "
                  "boot and teardown."]
    return "\n".join(lines) + "\n"


def _cmd_mutants(args: argparse.Namespace) -> int:
    names = args.candidate or _default_candidates(known_bug=True)
    unknown = [n for n in names if n not in registry.available()]
    if unknown:
        print(f"{PROG}: {registry.UnknownCandidate(unknown[0], list(registry.available()))}",
              file=sys.stderr)
        return 2
    status = None
    if _stdout_is_terminal():
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
        _print_table("stage2-conformance mutants (medians over seeds)", header, body,
                     right_from=4)
    if args.json:
        _write_out(args.json, json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        _write_out(args.markdown, mutants_markdown(rows))
    return 0 if all(r["caught"] for r in rows) else 1


def _add_mutants(sub) -> None:
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
    p.add_argument("--seeds", type=_positive, default=5, metavar="N",
                   help="seeded runs per mutant, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--examples", type=_positive, default=300, metavar="N",
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
    p.set_defaults(func=_cmd_mutants)


# ------------------------------------------------------------------- replay
def _capability_warnings(doc: dict, cls: type) -> list[str]:
    from conformance import replay

    caps = getattr(cls, "capabilities", None)
    config = replay.decode(doc["config"]) if doc.get("config") else None
    if caps is None or config is None:
        return []
    out = []
    for feature in ("fwb", "hw_af", "dic"):
        if getattr(config, feature, False) and not getattr(caps, feature, True):
            out.append(f"the recorded VM uses {feature}, which this candidate does not "
                       "declare")
    if config.nr_vcpus > getattr(caps, "max_vcpus", config.nr_vcpus):
        out.append(f"the recorded VM has {config.nr_vcpus} vCPUs; this candidate "
                   f"declares at most {caps.max_vcpus}")
    return out


def _cmd_replay(args: argparse.Namespace) -> int:
    from conformance import replay, report

    try:
        doc = replay.load(args.file)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: cannot read replay file {args.file}: {exc}", file=sys.stderr)
        return 2
    name = args.candidate or doc["candidate"]
    recorded = doc.get("failure") or {}
    try:
        cls = registry.load(name)
    except registry.UnknownCandidate as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except registry.CandidateImportError as exc:
        print(f"ERROR {name}: [candidate-error: import] in step 0: import: {exc}")
        return 2
    steps = len(doc["steps"])
    print(f"replaying {args.file}: {steps} step(s) recorded against "
          f"{doc['candidate']}, now against {name}")
    for warning in _capability_warnings(doc, cls):
        print(f"warning: {warning}")
    if not doc["steps"]:  # a recorded import failure: the import was the replay
        print(f"PASS {name}: it imports now (recorded: [{recorded.get('property')}: "
              f"{recorded.get('kind')}] {recorded.get('message')})")
        return 0
    result, _machine, out = replay.replay_machine(doc, cls, candidate=name)
    if result.status == "pass":
        print(f"PASS {name}: the recorded program no longer fails "
              f"(recorded: [{recorded.get('property')}] in step {recorded.get('step')})")
        return 0
    report.show(report.from_doc(out, replay_path=args.file))
    now = result.failure
    if (recorded.get("property"), recorded.get("step")) == (now.property, now.step):
        print("the same failure as recorded")
    else:
        print(f"a different failure from the recorded one ([{recorded.get('property')}] "
              f"in step {recorded.get('step')})")
    return 2 if result.status == "error" else 1


def _add_replay(sub) -> None:
    p = sub.add_parser(
        "replay", help="re-run a replay file without Hypothesis",
        description="Re-run the steps of a replay file (stage2-failures/NAME.json) "
                    "deterministically, without Hypothesis and without writing failure "
                    "files, and print the report. Exit 1 if it still fails, 0 if it "
                    "passes (e.g. against a fixed candidate), 2 for a candidate error "
                    "(including one that still fails to import) or an unreadable file.")
    p.add_argument("file", metavar="FILE", help="the replay JSON file")
    p.add_argument("--candidate", metavar="NAME",
                   help="replay against this registered candidate instead of the "
                        "recorded one")
    p.set_defaults(func=_cmd_replay)


# ------------------------------------------------------------------ explain
def _cmd_explain(args: argparse.Namespace) -> int:
    from conformance import explain

    if args.property is None:
        sys.stdout.write(explain.summary())
        return 0
    text = explain.explain(args.property)
    if text is None:
        print(f"{PROG}: unknown property {args.property!r}; known: "
              f"{', '.join(explain.family_names())} (and the oracle rules R1-R6)",
              file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain", help="what a property family checks, with its reference",
        description="Print the rule behind a property family (the name in brackets in "
                    "a failure, e.g. tlb-conflict), the oracle rules it applies, and the "
                    "reference invariants and sections it cites. Without PROPERTY, list "
                    "the families. Also accepts the oracle rules R1-R6. An unknown name "
                    "exits 2.")
    p.add_argument("property", nargs="?", metavar="PROPERTY",
                   help="a property family, e.g. stale-translation, or R1-R6")
    p.set_defaults(func=_cmd_explain)


# --------------------------------------------------------------------- main
#: Subcommand name -> function adding its parser (keep in display order).
COMMANDS: dict[str, Callable] = {"list": _add_list, "run": _add_run, "matrix": _add_matrix,
                                 "mutants": _add_mutants, "replay": _add_replay,
                                 "explain": _add_explain}


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
