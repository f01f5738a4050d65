"""What the subcommands share: output helpers, the timed run and the live
progress line."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from conformance import registry
from conformance.failures import files

PROG = "stage2-conformance"


def escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ------------------------------------------------------------------ helpers
def stdout_is_terminal() -> bool:
    from rich.console import Console

    return Console(file=sys.stdout).is_terminal


def write_out(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (``-``: standard output)."""
    if path == "-":
        sys.stdout.write(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def live_totals(name: str):
    """The running machine class's totals for candidate ``name`` (passing
    programs and their steps so far), for progress displays."""
    from conformance.machines.sequential import Stage2Machine

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
    from conformance import runner

    first: dict = {}
    start = time.perf_counter()

    def listener(machine, failure, path):
        if not first and getattr(machine, "candidate_name", None) == name:
            first["seconds"] = time.perf_counter() - start
            first["examples"] = type(machine).totals.get("examples", 0) + 1

    files.listeners.append(listener)
    try:
        result = runner.run(name, cls, **kwargs)
    finally:
        files.listeners.remove(listener)
    return result, (first or None)


class Progress:
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

        totals = live_totals(self.name)
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

        self.start = time.perf_counter()
        self.spinner = Spinner("dots")
        files.listeners.append(self._count)
        self.live = Live(get_renderable=self._render, console=Console(file=sys.stdout),
                         transient=True, refresh_per_second=8)
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.stop()
        files.listeners.remove(self._count)
        return False


def maybe_progress(name: str, label: str):
    import contextlib

    return Progress(name, label) if stdout_is_terminal() else contextlib.nullcontext()



def add_shared_db(p) -> None:
    p.add_argument("--shared-db", metavar="redis://HOST:PORT",
                   help="share the example database through Redis (with the local "
                        "directory database): failures found by any machine are "
                        "replayed first everywhere. A derandomized profile (ci) runs "
                        "non-derandomized with it. Needs the redis package.")


def print_table(title: str, header: list[str], body: list[list[str]],
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


def default_candidates(known_bug: bool) -> list[str]:
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


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.{digits}f}"
    return str(int(value)) if isinstance(value, float) else str(value)


def finding_lines(counters: dict) -> list[str]:
    """One line per known finding a passing run showed (``known finding: ID``
    counters; docs/findings.md)."""
    from conformance.findings import FINDINGS

    out = []
    for key, n in sorted(counters.items()):
        if key.startswith("known finding: ") and n:
            fid = key.split(": ", 1)[1]
            page = FINDINGS[fid].page if fid in FINDINGS else "docs/findings.md"
            out.append(f"known finding {fid}: shown {n} time(s), declared by the candidate "
                       f"and reported instead of failed (see {page})")
    return out


def markdown_table(header: list[str], body: list[list[str]], left: int) -> list[str]:
    """A Markdown table's lines: the first ``left`` columns left-aligned, the
    rest right-aligned, ``|`` in cells escaped."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                    for row in body]

