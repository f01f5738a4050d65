"""``stage2-conformance list``: the registered candidates."""

from __future__ import annotations

import argparse
import json
import sys

from conformance import registry
from conformance.cli.common import PROG, escape

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


def command(args: argparse.Namespace) -> int:
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
            table.add_row(row["name"], "[red]error[/red]", f"[red]{escape(reason)}[/red]",
                          "-", row["entry_point"])
            continue
        kind = row["kind"] if row["kind"] == "correct" else f"[yellow]{row['kind']}[/yellow]"
        table.add_row(row["name"], kind, escape(row["capabilities"] or "-"),
                      row["version"] or "-", row["entry_point"])
    if rows:
        console.print(table)
        console.print(f"{len(rows)} candidate(s); run one with: "
                      f"{PROG} run --candidate NAME", highlight=False)
    else:
        console.print(f"no candidates registered under {registry.GROUP!r}", highlight=False)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list the registered candidates",
                       description="List the candidates registered under the entry-point "
                                   f"group {registry.GROUP!r}.")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {name, kind, capabilities, version, "
                        "entry_point, error}")
    p.set_defaults(func=command)
